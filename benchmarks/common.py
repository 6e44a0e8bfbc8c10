"""What the benchmark scripts share: results files, the machine line, process pools, a process-group launcher,
markdown tables, and the digits task of the robust-training studies (Robust D-SHB in one process or in real DDP,
with a cache of finished runs).

Every script takes ``--quick`` and ``--out DIR``. A full run writes into ``benchmarks/results/`` (the committed
results); ``--quick`` without ``--out`` writes into a fresh temporary directory, so a smoke run never overwrites
them; ``--out DIR`` writes into ``DIR``. Text after :data:`NOTES_MARKER` in an existing results file is
hand-written and kept when the script rewrites the file.

The library's names below its public top level are imported here and nowhere else in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import io
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TextIO

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_clip.core.adagc import adagc_coefficients
from lightning_clip.core.functional import clip_grads_with_norm_
from lightning_clip.core.grads import gradient_stats
from lightning_clip.core.search import SearchRule, candidate_grid, divergence_step, probe_median, schedule_steps, search
from lightning_clip.core.unitwise import adaptive_clip_grads_
from lightning_clip.distributed.hook import ARCHookState, arc_hook
from lightning_clip.robust import pipeline
from lightning_clip.robust.arc import arc_num_clipped
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.privacy import epsilon
from lightning_clip.robust.transforms import SendBuffers, SendTransform
from lightning_clip.sim.adaptive import line_search
from lightning_clip.sim.byzantine import ByzantineSpec, ByzantineTransform, simulate_sends
from lightning_clip.sim.data import ALPHABET, adding_problem, load_digits_tensors, markov_text, word_text
from lightning_clip.sim.partition import dirichlet_split, extreme_split

__all__ = [
    # the library's names the scripts use
    "ARCConfig", "ARCHookState", "ByzantineSpec", "ByzantineTransform", "SendBuffers", "SendTransform", "arc_hook",
    "adding_task", "arc_num_clipped", "flower_api", "clip_grads_with_norm_", "epsilon", "gradient_stats",
    "load_digits_tensors", "markov_text", "simulate_sends",
    # the tuning-free study's
    "ALPHABET", "SearchRule", "adaptive_clip_grads_", "adagc_coefficients", "adding_problem", "candidate_grid",
    "divergence_step", "probe_median", "schedule_steps", "search", "word_text",
    # results, machine, processes, tables
    "NOTES_MARKER", "RESULTS_DIR", "StdoutRecord", "add_output_arguments", "command_line", "free_port", "kept_notes",
    "machine", "md_table", "output_dir", "process_map", "run_ranks", "summary_stats", "write_results",
    # the digits task of the robust-training studies
    "ATTACKS", "ATTACK_REVISION", "BYZFL_ATTACKS", "BYZFL_VERSION", "FOE_FINE_GRID", "HETEROGENEITY", "LABEL_FLIP",
    "NUM_CLASSES", "ByzflAttack",
    "Data", "Result", "Setting", "SharedAttack", "TrainingRun", "accuracy", "attack_transforms", "byzfl_attacks",
    "cache_path", "honest_shards", "line_search", "load_data", "load_result", "make_model", "rank_generator",
    "run_ddp_all", "run_key", "run_sim_all", "sample_batch", "save_result", "shard_sizes", "split_cached",
    "split_seed_of", "train_sim",
]


def adding_task() -> tuple[Any, Any]:
    """The library demo's ``(AddingProblemDataModule, AddingRNN)``, imported on call (they load Lightning)."""
    from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN

    return AddingProblemDataModule, AddingRNN


def flower_api() -> Any:
    """``lightning_clip.flower``, imported on call (it needs the extra ``lightning-clip[flower]``)."""
    return importlib.import_module("lightning_clip.flower")


# --------------------------------------------------------------------------------------------- results files

#: The committed results of the full runs.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The line after which a results file is hand-written (kept when the script rewrites the file).
NOTES_MARKER = "<!-- hand-written notes below: kept when the script rewrites this file -->"


def add_output_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """Add ``--quick`` (with ``quick_help``) and ``--out`` to ``parser``."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}; "
                        "with --quick a new temporary directory, so the committed results stay as they are)")


def output_dir(out: str | os.PathLike[str] | None, quick: bool, name: str) -> str:
    """The directory to write ``name``'s results into, created: ``out``, else a temporary one for ``quick``.

    Prints where the results go when that is not ``benchmarks/results``.
    """
    if out is not None:
        path = Path(out)
    elif quick:
        path = Path(tempfile.mkdtemp(prefix=f"lightning_clip_{name}_quick_"))
    else:
        path = RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    if path.resolve() != RESULTS_DIR:
        print(f"results of this run go to {path}", flush=True)
    return str(path)


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that runs script ``name`` with ``argv`` (default: this process's arguments)."""
    return shlex.join(["python", "-m", f"benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)])


def kept_notes(path: str | os.PathLike[str]) -> str:
    """The hand-written part of an existing results file (from :data:`NOTES_MARKER` on), or ``""``."""
    try:
        old = Path(path).read_text()
    except OSError:
        return ""
    i = old.find(NOTES_MARKER)
    return "\n" + old[i:] if i >= 0 else ""


def write_results(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path``, followed by the hand-written notes of the file it replaces."""
    content = (text if text.endswith("\n") else text + "\n") + kept_notes(path)
    Path(path).write_text(content if content.endswith("\n") else content + "\n")


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


class StdoutRecord:
    """Copy what the script prints into ``<out>/<filename>`` (for scripts whose results are their output).

    ``start()`` tees ``sys.stdout``; ``close()`` restores it and writes the file (with kept notes).
    Nothing is written if the script fails before ``close()``.
    """

    def __init__(self, out: str | os.PathLike[str], filename: str) -> None:
        self.path = Path(out) / filename
        self._buffer = io.StringIO()
        self._stdout: TextIO | None = None

    def start(self) -> StdoutRecord:
        self._stdout = sys.stdout
        sys.stdout = _Tee(self._stdout, self._buffer)  # type: ignore[assignment]
        return self

    def close(self) -> None:
        if self._stdout is not None:
            sys.stdout = self._stdout
            self._stdout = None
        write_results(self.path, self._buffer.getvalue())
        print(f"wrote {self.path}", flush=True)


def machine() -> str:
    """nproc, CPU model, torch/Lightning/Python versions and OS."""
    import lightning

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"nproc={os.cpu_count()}, CPU: {cpu}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], pad: bool = False) -> str:
    """A markdown table; ``pad`` aligns the columns with spaces (for plain-text results)."""
    if not pad:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, "|" + "|".join("-" * (w + 2) for w in widths) + "|", *body])


def summary_stats(xs: Iterable[float]) -> dict[str, float]:
    """Median, mean, 10th and 90th percentile (lower sample) and count of timings."""
    xs = sorted(xs)
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "p10": xs[int(0.1 * (len(xs) - 1))],
            "p90": xs[int(0.9 * (len(xs) - 1))], "n": len(xs)}


# --------------------------------------------------------------------------------------------- processes


def process_map(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """``fn`` over ``jobs``, results in job order: in this process if ``workers <= 1``, else in ``workers``
    spawned processes (``initializer(*initargs)`` runs first in each)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                             initargs=initargs) as ex:
        yield from ex.map(fn, jobs, chunksize=1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, backend: str, threads: int | None, out: str,
               fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def run_ranks(fn: Callable[..., Any], world: int, args: tuple = (), backend: str = "gloo",
              threads: int | None = 1) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes of one process group; every rank's return.

    ``threads``: torch's intra-op threads per process (``None``: torch's default). ``fn`` must be importable
    (a module-level function) and its return picklable.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, free_port(), backend, threads, out, fn, args), nprocs=world,
                           start_method="spawn", join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------------------------- the digits task

NUM_CLASSES = 10
#: The data-level attack: a Byzantine worker's gradient on the labels ``y -> 9 - y``.
LABEL_FLIP = "LF"
#: The magnitudes of FOE-LS-1s-fine's search: twelve, denser than the library's default seven between 0.1 and 100.
FOE_FINE_GRID: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: Attack label -> ``ByzantineSpec`` keyword arguments (ranks added per run); ``None``: the label flip.
ATTACKS: dict[str, dict[str, Any] | None] = {
    "SF": {"attack": "sign_flip"},
    LABEL_FLIP: None,
    "FOE-LS": {"attack": "foe_ls", "search": "ours"},
    "FOE-LS-bf": {"attack": "foe_ls", "search": "byzfl"},
    "ALIE-LS": {"attack": "alie_ls", "search": "ours"},
    "ALIE-LS-bf": {"attack": "alie_ls", "search": "byzfl"},
    "FOE-LS-1s": {"attack": "foe_ls", "search": "ours", "sign": 1},
    "FOE-LS-1s-fine": {"attack": "foe_ls", "search": "ours", "sign": 1, "grid": FOE_FINE_GRID},
    "ALIE-LS-1s": {"attack": "alie_ls", "search": "ours", "sign": -1},
    "Mimic": {"attack": "mimic"},
    "ALIE": {"attack": "alie"},
    "FOE": {"attack": "foe"},
    "NaN": {"attack": "nan"},
    "scale": {"attack": "scale", "factor": 1e3},
}
#: Attacks whose definition changed after runs were cached under their label: the revision joins the cache key.
#: Revision 2 of "FOE-LS" / "ALIE-LS": the library's search over both signs without a cap (was: one sign, capped).
ATTACK_REVISION: dict[str, int] = {"FOE-LS": 2, "ALIE-LS": 2}
#: Heterogeneity label -> Dirichlet alpha (``None``: the extreme sorted split).
HETEROGENEITY: dict[str, float | None] = {"extreme": None, "a=0.1": 0.1, "a=0.5": 0.5, "a=1": 1.0}
#: The ByzFL release the reference attacks were checked against (``pip install --no-deps byzfl==...``).
BYZFL_VERSION = "0.0.11"
#: Attack label -> (the library's attack family, ByzFL's class of the same attack): the attacks whose line search
#: is ByzFL's, which ByzFL's own code can compute instead of the library (``impl="byzfl"``).
BYZFL_ATTACKS: dict[str, tuple[str, str]] = {"FOE-LS-bf": ("foe", "Optimal_InnerProductManipulation"),
                                             "ALIE-LS-bf": ("alie", "Optimal_ALittleIsEnough")}


def attack_transforms(attack: str | None, ranks: Sequence[int], impl: str = "ours") -> list[SendTransform]:
    """The vector-level attack ``attack`` of ``ranks`` as send transforms (none for no attack or the label flip).

    ``impl="byzfl"``: an attack of :data:`BYZFL_ATTACKS` computed by ByzFL's own class (:class:`ByzflAttack`).
    """
    if impl == "byzfl":
        if attack not in BYZFL_ATTACKS:
            raise ValueError(f"ByzFL's implementation covers the attacks {list(BYZFL_ATTACKS)}, not {attack!r}")
        return [ByzflAttack(BYZFL_ATTACKS[attack][0], ranks)] if ranks else []
    kwargs = ATTACKS[attack] if attack is not None else None
    if not ranks or kwargs is None:
        return []
    return [ByzantineTransform.from_spec(ByzantineSpec(ranks=list(ranks), **kwargs))]


def byzfl_attacks() -> ModuleType:
    """ByzFL's attack module ``byzfl.attacks.attacks``, imported without the package's ``__init__``.

    ``import byzfl`` imports its federated framework and benchmark too, hence torchvision (which PyPI builds for
    CUDA torch: it does not load beside the CPU torch wheel) and seaborn; the attack module itself needs numpy,
    scipy and torch only. So the package object is created from its spec without executing its ``__init__``, and
    only ``byzfl.attacks`` (with ``byzfl.utils`` and ``byzfl.aggregators``, which it imports) is loaded.
    Install it with ``pip install --no-deps byzfl==0.0.11`` (plain ``pip install byzfl`` replaces torch).

    Raises:
        ModuleNotFoundError: If ByzFL is not installed (the message says how to install it).
    """
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(
                f"ByzFL is not installed; install it without its dependencies (they would replace torch): "
                f"pip install --no-deps byzfl=={BYZFL_VERSION} (its attacks need numpy and scipy: the [bench] extra)",
                name="byzfl")
        sys.modules["byzfl"] = importlib.util.module_from_spec(spec)  # its __init__ is not run
    return importlib.import_module("byzfl.attacks.attacks")


class _AggregationCache:
    """The server's aggregation with every evaluated stack remembered (by its bytes) and the misses counted."""

    def __init__(self, aggregation: Callable[[Tensor], Tensor]) -> None:
        self.aggregation = aggregation
        self.seen: dict[tuple, Tensor] = {}
        self.misses = 0

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.detach().cpu().contiguous().numpy().tobytes())
        if key not in self.seen:
            self.misses += 1
            self.seen[key] = self.aggregation(x)
        return self.seen[key]


class ByzflAttack:
    """ByzFL's line-searched FOE (``Optimal_InnerProductManipulation``) or ALIE (``Optimal_ALittleIsEnough``) as a
    send transform: a reference for the library's ``foe_ls`` / ``alie_ls``.

    ByzFL's class (its defaults: start 0, step 10, ratio 0.8, 20 evaluations) searches against the row's pipeline,
    passed as its aggregator with no pre-aggregator, and computes the vector sent. Every step it also runs the
    differential check: the library's ByzFL-style search (``line_search(..., search="byzfl")``) on the same honest
    vectors and pipeline must send the same vector, and the library's ``foe`` / ``alie`` at the factor it found must
    equal ByzFL's ``InnerProductManipulation`` / ``ALittleIsEnough`` at that factor. :attr:`stats` holds the largest
    absolute differences, the steps checked and the aggregations the library's search needed beyond ByzFL's own
    (0 when it evaluated exactly ByzFL's vectors).
    """

    def __init__(self, attack: str, ranks: Sequence[int], check: bool = True) -> None:
        if attack not in ("foe", "alie"):
            raise ValueError(f"Expected argument `attack` to be 'foe' or 'alie' but got {attack!r}")
        self.attack, self.ranks, self.check = attack, tuple(ranks), check
        self.stats: dict[str, float] = {"steps": 0, "search_max_abs_diff": 0.0, "fixed_max_abs_diff": 0.0,
                                        "extra_evals": 0, "byzfl_evals": 0, "max_abs": 0.0}

    def __call__(self, sent: SendBuffers, ctx: Any) -> None:
        flat = sent.flatten()
        rows = ctx.gather(flat)[[r for r in range(ctx.world_size) if r not in self.ranks]]  # a collective: all ranks
        if ctx.rank not in self.ranks:
            return
        byzfl = byzfl_attacks()
        agg = _AggregationCache(ctx.aggregation)
        cls = getattr(byzfl, _BYZFL_CLASS[self.attack])
        vec = cls(agg=agg, pre_agg_list=[], f=len(self.ranks))(rows)
        sent.write_(vec.to(flat.dtype))
        if not self.check:
            return
        byzfl_evals = agg.misses
        res = line_search(self.attack, rows, len(self.ranks), agg, search="byzfl")
        ours = res.vector(self.attack, rows)
        tau = -res.factor if self.attack == "alie" else res.factor
        fixed = (byzfl.ALittleIsEnough(tau=float(tau)) if self.attack == "alie"
                 else byzfl.InnerProductManipulation(tau=float(tau)))(rows)
        st = self.stats
        st["steps"] += 1
        st["byzfl_evals"] += byzfl_evals
        st["extra_evals"] += agg.misses - byzfl_evals
        st["search_max_abs_diff"] = max(st["search_max_abs_diff"], float((ours - vec).abs().max()))
        st["fixed_max_abs_diff"] = max(st["fixed_max_abs_diff"], float((ours - fixed).abs().max()))
        st["max_abs"] = max(st["max_abs"], float(vec.abs().max()))


_BYZFL_CLASS = {family: cls for family, cls in BYZFL_ATTACKS.values()}


class SharedAttack:
    """Simulation only: an omniscient attack's Byzantine ranks all send one vector per step, computed once.

    Wraps a :class:`ByzantineTransform` whose attack needs the honest vectors, or a :class:`ByzflAttack`: every
    Byzantine rank computes the same vector from the same gathered rows (the hook's contract), so the first
    Byzantine rank of a step computes it and the others copy it -- the same bits as ``f`` separate computations.
    Every rank's chain holds the same instance.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._step: int | None = None
        self._vector: Tensor | None = None

    @staticmethod
    def applies(transform: Any) -> bool:
        return isinstance(transform, ByzflAttack) or (isinstance(transform, ByzantineTransform)
                                                      and transform.spec.needs_honest)

    def _byzantine(self, rank: int) -> bool:
        inner = self.inner
        return rank in inner.ranks if isinstance(inner, ByzflAttack) else inner.spec.is_byzantine(rank)

    def __call__(self, sent: SendBuffers, ctx: Any) -> None:
        if not self._byzantine(ctx.rank) or self._step != ctx.step:
            self.inner(sent, ctx)
            if self._byzantine(ctx.rank):
                self._step, self._vector = ctx.step, sent.flatten().clone()
            return
        assert self._vector is not None
        sent.write_(self._vector)


@dataclass(frozen=True)
class Setting:
    """Hyperparameters shared by every run of a study."""

    honest: int = 10
    batch: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-4
    beta: float = 0.9  # worker momentum
    steps: int = 200
    eval_every: int = 10
    hidden: int = 64
    clip: float = 2.0  # C of static clipping
    robust_comm: str = "sharded"  # how the DDP runs move the vectors (ARCConfig.robust_comm)
    init_jitter: float = 0.0  # relative noise on the initial weights: a control for float sensitivity


class TrainingRun(Protocol):
    """One training run of a study: ``honest`` workers on shards of heterogeneity ``het``, then the Byzantine ones.

    A frozen dataclass: its fields and the :class:`Setting` make its cache key. It may also have a field
    ``split_seed`` (the seed of the Dirichlet split; ``None``: ``seed``), read by :func:`split_seed_of`.
    """

    @property
    def het(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def honest(self) -> int: ...
    @property
    def attack(self) -> str | None: ...
    @property
    def n(self) -> int: ...
    @property
    def label(self) -> str: ...

    def config(self, setting: Setting) -> ARCConfig:
        """The server pipeline and worker momentum: what every rank's hook (or the simulated server) runs."""

    def transforms(self) -> list[SendTransform]:
        """The simulated attack, run after the worker momentum in every rank's chain of send transforms."""


@dataclass
class Result:
    run: Any  # a TrainingRun
    accs: list[float]  # test accuracy at every evaluation
    wall: float  # seconds
    steps_done: int  # fewer than the setting's steps when the weights became non-finite
    final: Tensor | None = None  # final flat parameters in ``model.parameters()`` order
    checks: dict[str, float] | None = None  # the differential check of a ByzFL reference run (ByzflAttack.stats)

    @property
    def max_acc(self) -> float:
        return max(self.accs)


@dataclass
class Data:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_data(test_fraction: float = 0.2, split_seed: int = 0) -> Data:
    """scikit-learn's digits (x in [0, 1]), a fixed random train/test split."""
    x, y = load_digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Data(x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous())


def split_seed_of(run: TrainingRun) -> int:
    """The seed of ``run``'s Dirichlet split: its ``split_seed`` field when set, else its training ``seed``."""
    split_seed = getattr(run, "split_seed", None)
    return run.seed if split_seed is None else int(split_seed)


def shard_sizes(data: Data, het: str, honest: int, split_seed: int) -> list[int]:
    """How many train samples each honest worker holds under this split."""
    return [len(s) for s in honest_shards(data, het, honest, split_seed)]


def honest_shards(data: Data, het: str, honest: int, seed: int) -> list[Tensor]:
    """Train-split indices of each honest worker (``seed``: the split's seed; the extreme split has none)."""
    alpha = HETEROGENEITY[het]
    if alpha is None:
        return extreme_split(data.train_y, honest)
    with torch.random.fork_rng(devices=[]):  # dirichlet_split reseeds torch's global generator
        return dirichlet_split(data.train_y, honest, alpha, seed=seed)


def _run_shards(run: TrainingRun, data: Data, known: dict[tuple, list[Tensor]]) -> list[Tensor]:
    """``run``'s honest shards, computed once per split in ``known``."""
    key = (run.het, run.honest, split_seed_of(run))
    if key not in known:
        known[key] = honest_shards(data, run.het, run.honest, split_seed_of(run))
    return known[key]


def make_model(seed: int, hidden: int = 64, jitter: float = 0.0) -> nn.Module:
    """The MLP 64-hidden-10 (the architecture of the library's demo ``DigitsClassifier``), seeded init.

    ``jitter > 0`` multiplies every initial weight by ``1 + jitter * N(0, 1)`` (its own seeded draw): a
    perturbation of the size of float rounding, to see how far it alone moves a run.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
    if jitter > 0:
        gen = torch.Generator().manual_seed(seed + 104_729)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + jitter * torch.randn(p.shape, generator=gen))
    return model


def rank_generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + 29)


def sample_batch(data: Data, shards: list[Tensor], rank: int, batch: int, gen: torch.Generator,
                 label_flip: bool) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s next batch: from its shard if honest, from the whole train split if Byzantine."""
    honest = len(shards)
    if rank < honest:
        pool = shards[rank]
        idx = pool[torch.randint(len(pool), (batch,), generator=gen)]
    else:
        idx = torch.randint(len(data.train_y), (batch,), generator=gen)
    x, y = data.train_x[idx], data.train_y[idx]
    if rank >= honest and label_flip:
        y = (NUM_CLASSES - 1) - y
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy; a sample whose logits are not finite counts as wrong."""
    logits = model(x)
    ok = (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)
    return float(ok.float().mean())


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _result(run: TrainingRun, setting: Setting, model: nn.Module, data: Data, accs: list[float], t0: float,
            steps_done: int) -> Result:
    # A non-finite model stays non-finite: its remaining evaluations are what it scores now.
    while len(accs) < setting.steps // setting.eval_every:
        accs.append(accuracy(model, data.test_x, data.test_y))
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    return Result(run, accs, time.perf_counter() - t0, steps_done, final)


def _bucket_order(num_params: int, step: int) -> list[int]:
    """Indices (into ``model.parameters()``) in the order of DDP's single gradient bucket at ``step`` (1-based).

    DDP's first bucket follows the parameter order; after the first iteration it is rebuilt in the order
    the gradients became ready in backward (last layer first), which for this ``Sequential`` is the reverse
    order. The simulation flattens in the same layout so every reduction sums in the same order.
    """
    return list(range(num_params)) if step == 1 else list(reversed(range(num_params)))


def train_sim(run: TrainingRun, setting: Setting, data: Data, shards: list[Tensor]) -> Result:
    """Train ``run`` with all ``n`` workers in this process (Robust D-SHB), through the library's send chains."""
    t0 = time.perf_counter()
    model = make_model(run.seed, setting.hidden, setting.init_jitter)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=setting.lr, weight_decay=setting.weight_decay)
    config = run.config(setting)
    server = pipeline.server_aggregation(config)
    # every rank's own momentum and attack; an omniscient attack computed once per step for all its ranks
    shared = [SharedAttack(t) if SharedAttack.applies(t) else None for t in run.transforms()]
    chains = [config.send_chain([s if s is not None else t for s, t in zip(shared, run.transforms())])
              for _ in range(run.n)]
    gens = [rank_generator(run.seed, r) for r in range(run.n)]
    accs: list[float] = []
    step = 0
    for step in range(1, setting.steps + 1):
        order = _bucket_order(len(params), step)
        sends = []
        for r in range(run.n):  # the same autograd computation as each DDP rank's backward
            x, y = sample_batch(data, shards, r, setting.batch, gens[r], run.attack == LABEL_FLIP)
            g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
            flat = torch.cat([g[i].reshape(-1) for i in order])  # DDP's single bucket
            sends.append(SendBuffers([flat], [[params[i] for i in order]]))
        agg = server(simulate_sends(chains, sends, step - 1, server))
        offset = 0
        for i in order:
            p = params[i]
            p.grad = agg[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        if step % setting.eval_every == 0:
            accs.append(accuracy(model, data.test_x, data.test_y))
        if not _all_finite(model):
            break
    res = _result(run, setting, model, data, accs, t0, step)
    checks = [s.inner.stats for s in shared if s is not None and isinstance(s.inner, ByzflAttack)]
    res.checks = checks[0] if checks else None
    return res


def _train_ddp(rank: int, run: TrainingRun, setting: Setting, data: Data, shards: list[Tensor]) -> Result | None:
    """Train ``run`` as rank ``rank`` of a DDP replica whose gradient averaging is the library's hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    t0 = time.perf_counter()
    model = make_model(run.seed, setting.hidden, setting.init_jitter)
    ddp = DDP(model, bucket_cap_mb=64)  # one bucket: the whole gradient
    ddp.register_comm_hook(ARCHookState(run.config(setting), transforms=run.transforms()), arc_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=setting.lr, weight_decay=setting.weight_decay)
    gen = rank_generator(run.seed, rank)
    accs: list[float] = []
    step = 0
    for step in range(1, setting.steps + 1):
        x, y = sample_batch(data, shards, rank, setting.batch, gen, run.attack == LABEL_FLIP)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if rank == 0 and step % setting.eval_every == 0:
            accs.append(accuracy(model, data.test_x, data.test_y))
        if not _all_finite(model):  # identical replicas: every rank stops at the same step
            break
    return _result(run, setting, model, data, accs, t0, step) if rank == 0 else None


# --------------------------------------------------------------------------------------------- result cache

#: Fields (of the setting or of a run) added after runs were cached: at these values they stay out of the key,
#: so the old runs are reused.
_KEYLESS_DEFAULTS = {"robust_comm": "sharded", "init_jitter": 0.0, "split_seed": None, "impl": "ours"}


def _keyed(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted((k, v) for k, v in fields.items() if _KEYLESS_DEFAULTS.get(k, ...) != v)


def run_key(run: TrainingRun, setting: Setting) -> str:
    """The cache key of ``run`` under ``setting`` (with the attack's :data:`ATTACK_REVISION`, if any)."""
    text = repr(_keyed(asdict(run))) + repr(_keyed(asdict(setting)))  # type: ignore[call-overload]
    revision = ATTACK_REVISION.get(run.attack) if run.attack is not None else None
    if revision is not None:
        text += f"attack revision {revision}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_path(cache: str | None, mode: str, run: TrainingRun, setting: Setting) -> str | None:
    return None if cache is None else os.path.join(cache, mode, f"{run_key(run, setting)}.pt")


def save_result(path: str | None, result: Result) -> None:
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"run": asdict(result.run), "accs": result.accs, "wall": result.wall,
                "steps_done": result.steps_done, "final": result.final, "checks": result.checks}, tmp)
    os.replace(tmp, path)


def load_result(path: str | None, run_type: type) -> Result | None:
    if path is None or not os.path.exists(path):
        return None
    rec = torch.load(path, weights_only=False)
    return Result(run_type(**rec["run"]), rec["accs"], rec["wall"], rec["steps_done"], rec["final"],
                  rec.get("checks"))


def split_cached(runs: Sequence[TrainingRun], setting: Setting, cache: str | None,
                 mode: str) -> tuple[list[Result], list[TrainingRun]]:
    """The runs found in the cache (as results) and the runs still to do."""
    done, todo = [], []
    for run in runs:
        res = load_result(cache_path(cache, mode, run, setting), type(run))
        if res is None:
            todo.append(run)
        else:
            done.append(res)
    return done, todo


# --------------------------------------------------------------------------------------------- the two runners

_SIM_CTX: dict[str, Any] = {}


def _sim_init(setting: Setting, threads: int, cache: str | None) -> None:
    torch.set_num_threads(threads)
    _SIM_CTX.update(setting=setting, data=load_data(), shards={}, cache=cache)


def _sim_one(run: TrainingRun) -> Result:
    data: Data = _SIM_CTX["data"]
    res = train_sim(run, _SIM_CTX["setting"], data, _run_shards(run, data, _SIM_CTX["shards"]))
    save_result(cache_path(_SIM_CTX["cache"], "sim", run, _SIM_CTX["setting"]), res)
    return res


def run_sim_all(runs: Sequence[TrainingRun], setting: Setting, jobs: int, threads: int, cache: str | None,
                label: str = "sim") -> list[Result]:
    """Every run in simulation, in ``jobs`` processes of ``threads`` torch threads, in the given order (the
    cached ones from ``cache``; the others are cached there when done)."""
    results, todo = split_cached(runs, setting, cache, "sim")
    if results:
        print(f"  [{label}] {len(results)} runs from the cache, {len(todo)} to run", flush=True)
    t0 = time.perf_counter()
    every = max(1, len(todo) // 20)
    for i, res in enumerate(process_map(_sim_one, todo, jobs, _sim_init, (setting, threads, cache))):
        results.append(res)
        if (i + 1) % every == 0 or i + 1 == len(todo):
            print(f"  [{label}] {i + 1}/{len(todo)} runs, {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def _ddp_launch(rank: int, world: int, runs: list[TrainingRun], setting: Setting, data: Data,
                cache: str | None) -> list[Result]:
    results: list[Result] = []
    shards: dict[tuple, list[Tensor]] = {}
    t_launch = time.perf_counter()
    for i, run in enumerate(runs):
        if run.n != world:
            raise RuntimeError(f"run {run} needs {run.n} ranks, this launch has {world}")
        res = _train_ddp(rank, run, setting, data, _run_shards(run, data, shards))
        if res is not None:
            results.append(res)
            save_result(cache_path(cache, "ddp", run, setting), res)
            print(f"  [ddp n={world}] {i + 1}/{len(runs)} {run.label}: max acc {res.max_acc:.3f}, final acc "
                  f"{res.accs[-1]:.3f}, {res.wall:.1f} s, {time.perf_counter() - t_launch:.0f} s", flush=True)
    dist.barrier()
    return results


def run_ddp_all(runs: Sequence[TrainingRun], setting: Setting,
                cache: str | None) -> tuple[list[Result], dict[int, float]]:
    """Every run in real DDP: one launch of ``n`` gloo processes per world size ``n``, the runs in the given
    order; returns the results and the wall time of each launch (cache as in :func:`run_sim_all`)."""
    results, todo = split_cached(runs, setting, cache, "ddp")
    if results:
        print(f"  [ddp] {len(results)} runs from the cache, {len(todo)} to run", flush=True)
    by_world: dict[int, list[TrainingRun]] = defaultdict(list)
    for run in todo:
        by_world[run.n].append(run)
    walls: dict[int, float] = {}
    data = load_data()
    for world, group in sorted(by_world.items()):
        print(f"  [ddp] launching {world} gloo processes for {len(group)} runs", flush=True)
        t0 = time.perf_counter()
        results += run_ranks(_ddp_launch, world, (group, setting, data, cache))[0]
        walls[world] = time.perf_counter() - t0
    return results, walls
