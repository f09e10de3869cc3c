"""The fused native scoring + top-N kernel for factor policies, built on first use.

`topn_kernel.c` scores users against every service, keeps each user's n best, their softmax
weights and the tail masses (`rec.topn.Candidates`), and can fill the exploration slates too,
in one pass per user while the row sits in cache. It also runs a policy's user tower (a tanh
MLP, `UserTower`) without torch's per-operation overheads. It is compiled with the system's C
compiler (`CC`, default `cc`) into a cache folder keyed by the source, the flags and the CPU,
so a clean checkout needs no build step; `REC_NATIVE=0` turns it off. Without a compiler the
callers fall back to the torch implementation in `rec.policy` / `rec.topn`, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from rec import topn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("topn_kernel.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
"""No -ffast-math: the kernel's exp rounds with an add-and-subtract that it would remove."""
PORTABLE_FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")
"""Tried when the compiler rejects -march=native."""
MAX_N = 512
"""The most slots per user the kernel fills (MAX_N in the C source)."""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """Whether the native kernel may be used (REC_NATIVE unset or not 0/false/no/off)."""
    return os.environ.get("REC_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    """Where built kernels live: REC_NATIVE_CACHE, else the user's cache folder."""
    if os.environ.get("REC_NATIVE_CACHE"):
        return Path(os.environ["REC_NATIVE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rec" / "native"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a -march=native build only runs where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features")
    found = {line.split(":")[0].strip(): line for line in lines if line.startswith(wanted)}
    return platform.machine() + "".join(sorted(found.values()))


def build(compiler: str | None = None) -> Path:
    """Compile the kernel unless a build of this source for this CPU is cached; its path.

    Raises:
        RuntimeError: no compiler, or it failed (its message included).
    """
    compiler = compiler or os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + repr((compiler, FLAGS)).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"topn_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (FLAGS, PORTABLE_FLAGS):
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        command = [compiler, *flags, "-o", str(partial), str(SOURCE), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(partial, target)  # atomic: concurrent builders agree on one file
            log.info("built the native top-N kernel: %s", target)
            return target
        partial.unlink(missing_ok=True)
        errors.append(f"{' '.join(command)}: {done.stderr.strip()[-2000:]}")
    raise RuntimeError("compiling the native top-N kernel failed:\n" + "\n".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None when disabled or it cannot be built."""
    global _library, _tried
    if not enabled():
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _library = _load(build())
            except (RuntimeError, OSError) as error:
                log.warning("native top-N kernel unavailable, using the torch path: %s", error)
    return _library


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rec_candidates.argtypes = [pointer, i64, i32, pointer, i32, i32, ctypes.c_float, i32,
                                   pointer, pointer, pointer, pointer]
    lib.rec_rank.argtypes = [pointer, i64, i32, pointer, i32, i32, ctypes.c_float, i32,
                             ctypes.c_double, pointer, i32, ctypes.c_uint64, i64, pointer,
                             pointer, pointer]
    lib.rec_user_factors.argtypes = [pointer, i64, i32, pointer, pointer, pointer, i32, i32,
                                     pointer]
    lib.rec_candidates.restype = lib.rec_rank.restype = ctypes.c_int
    lib.rec_user_factors.restype = ctypes.c_int
    return lib


def transposed_items(items: torch.Tensor) -> torch.Tensor:
    """(D, padded width) contiguous float32 service factors, zero past the catalogue."""
    n_items, dim = items.shape
    items_t = torch.zeros(dim, topn.padded_width(n_items))
    items_t[:, :n_items] = items.detach().float().T
    return items_t


def _pointer(tensor: torch.Tensor | np.ndarray) -> int:
    if isinstance(tensor, np.ndarray):
        assert tensor.flags.c_contiguous
        return tensor.ctypes.data
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    return tensor.data_ptr()


def _check(status: int, what: str) -> None:
    if status == -1:
        raise ValueError(f"{what}: unsupported sizes")
    if status:
        raise MemoryError(f"{what}: out of memory")


def candidates(lib: ctypes.CDLL, users: torch.Tensor, items_t: torch.Tensor, cap: float,
               n: int, n_items: int) -> topn.Candidates:
    """`rec.topn.Candidates` of users (U, D) for services `transposed_items` (D, W).

    Args:
        lib: `library()`.
        users: user factors; logits are cap * tanh(users @ items_t / cap).
        items_t: from `transposed_items`.
        cap: the logit cap.
        n: candidates per user.
        n_items: real services (columns of items_t past it are padding).
    """
    users = users.detach().float().contiguous()
    width = items_t.shape[1]
    out = topn.Candidates(torch.empty(len(users), n, dtype=torch.long),
                          torch.empty(len(users), n),
                          torch.empty(len(users), n, dtype=torch.float64),
                          torch.empty(len(users), width // topn.BLOCK, dtype=torch.float64))
    _check(lib.rec_candidates(_pointer(users), len(users), users.shape[1], _pointer(items_t),
                              width, n_items, cap, n, _pointer(out.index), _pointer(out.score),
                              _pointer(out.weight), _pointer(out.tail)), "rec_candidates")
    return out


def rank(lib: ctypes.CDLL, users: torch.Tensor, items_t: torch.Tensor, cap: float, n: int,
         n_items: int, exploration: float,
         uniform: torch.Tensor | topn.CounterUniforms | None, index: np.ndarray,
         score: np.ndarray, propensity: np.ndarray) -> None:
    """Fill every user's n slots as `rec.topn.select` would, into the given (U, n) arrays.

    Args:
        lib, users, items_t, cap, n, n_items: as for `candidates`.
        exploration: share of slots drawn from the softmax.
        uniform: (U, n) float64 numbers in [0, 1), as `rec.topn.slot_uniforms` draws them,
            or a `rec.topn.CounterUniforms` whose numbers the kernel computes itself (no
            (U, n) array); None when exploration is 0.
        index: int32 output, columns of the catalogue.
        score: float32 output, the chosen logits.
        propensity: float32 output.
    """
    users = users.detach().float().contiguous()
    counter = uniform if isinstance(uniform, topn.CounterUniforms) else None
    if counter is not None:
        uniform = None
    if uniform is not None:
        uniform = uniform.contiguous()
        assert uniform.dtype == torch.float64 and uniform.shape == (len(users), n)
    for array, dtype in ((index, np.int32), (score, np.float32), (propensity, np.float32)):
        assert array.dtype == dtype and array.shape == (len(users), n)
    _check(lib.rec_rank(_pointer(users), len(users), users.shape[1], _pointer(items_t),
                        items_t.shape[1], n_items, cap, n, exploration,
                        None if uniform is None else _pointer(uniform),
                        int(counter is not None and exploration > 0.0),
                        counter.base if counter is not None else 0,
                        counter.first_row if counter is not None else 0, _pointer(index),
                        _pointer(score), _pointer(propensity)), "rec_rank")


class UserTower:
    """A tanh MLP (linear layers, tanh between them) run by the kernel: `factors` below.

    The weights are copied once, transposed and zero-padded to multiples of topn.BLOCK units
    (padded units output tanh(0) = 0 and feed zero weights), as the kernel wants them.
    """

    def __init__(self, lib: ctypes.CDLL, layers: list[torch.nn.Linear]):
        self.lib = lib
        self.in_dim = layers[0].in_features
        self.out_dim = layers[-1].out_features
        sizes = [self.in_dim]
        self.weights, self.biases = [], []
        for layer in layers:
            out_padded = -(-layer.out_features // topn.BLOCK) * topn.BLOCK
            weight_t = np.zeros((sizes[-1], out_padded), np.float32)
            weight_t[:layer.in_features, :layer.out_features] = layer.weight.detach().float().T
            bias = np.zeros(out_padded, np.float32)
            if layer.bias is not None:
                bias[:layer.out_features] = layer.bias.detach().float()
            self.weights.append(weight_t)
            self.biases.append(bias)
            sizes.append(out_padded)
        self.sizes = np.array(sizes, np.int32)
        self.weight_pointers = (ctypes.c_void_p * len(layers))(*map(_pointer, self.weights))
        self.bias_pointers = (ctypes.c_void_p * len(layers))(*map(_pointer, self.biases))

    def factors(self, features: torch.Tensor, ones_column: bool = True) -> torch.Tensor:
        """(U, out_dim [+ 1]) float32 outputs of features (U, in_dim), then a 1 if asked."""
        features = features.detach().float().contiguous()
        assert features.shape[1] == self.in_dim
        stride = self.out_dim + int(ones_column)
        out = torch.empty(len(features), stride)
        _check(self.lib.rec_user_factors(
            _pointer(features), len(features), len(self.weights), _pointer(self.sizes),
            self.weight_pointers, self.bias_pointers, self.out_dim, stride, _pointer(out)),
            "rec_user_factors")
        return out
