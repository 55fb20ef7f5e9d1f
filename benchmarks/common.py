"""Shared pieces of the benchmark cases: timing, memory, the persistent compilation cache, the
paper-size models on both sides (ours and the PyTorch reference, same weights through the
converter), machine description, JSON output and markdown tables.

Timing rule for every case: one warm-up call (which also compiles on our side; compile time is
measured apart, through ``compile_seconds``), then ``repeats`` timed calls, reported as the
median (and min). Both sides run in the same process, one after the other, never at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from phraseldm_jax import trees

MIB = 2**20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "phraseldm_jax", "xla")


@dataclasses.dataclass(frozen=True)
class Options:
    """What every case gets from the command line."""

    quick: bool = False  # tiny models and sizes (seconds; the test uses it)
    repeats: int = 5  # timed calls per measurement (after one warm-up)
    threads: int = os.cpu_count() or 1
    vae_workdir: str = ""  # trained PhraseVAE for the real-latent decoding case ("" = skip)
    latent_dir: str = ""  # its song-latent dataset (test split used)
    results_dir: str = os.path.join(REPO_ROOT, "benchmarks", "results")
    torch_ddpm_steps: int = 20  # reference DDPM steps actually run (then extrapolated to 1000)
    ldm_workdir: str = ""  # trained PhraseLDM (and the PhraseVAE it names): end-to-end songs


# --------------------------------------------------------------------------------------------
# Environment: threads, compilation cache, machine.


CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def cache_settings() -> dict[str, Any]:
    """The current persistent-cache settings (to restore them after an in-process run)."""
    return {name: getattr(jax.config, name) for name in CACHE_SETTINGS}


def restore_cache_settings(settings: dict[str, Any]) -> None:
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def enable_compilation_cache(cache_dir: str) -> int:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` with every program cached
    (no minimum compile time or size). Returns how many entries it already held."""
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # a cache set up earlier in this process used the old dir
    return len(os.listdir(cache_dir))


def set_torch_threads(threads: int) -> None:
    """Torch's intra-op threads = ``threads`` (the core count); one inter-op thread."""
    import torch

    torch.set_num_threads(threads)
    with_interop = getattr(torch, "set_num_interop_threads", None)
    try:
        if with_interop is not None:
            with_interop(1)
    except RuntimeError:  # only settable before torch's first parallel work
        pass


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, library versions and thread settings of this run."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        import diffusers
        import transformers

        info.update(transformers=transformers.__version__, diffusers=diffusers.__version__)
    except ImportError:
        info["torch"] = None
    return info


# --------------------------------------------------------------------------------------------
# Timing and memory.


@dataclasses.dataclass
class Timing:
    """Seconds per call of ``repeats`` timed calls after the warm-up."""

    times: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def min(self) -> float:
        return float(np.min(self.times))

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "times_s": self.times}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRss:
    """Highest RSS above the starting RSS while the block runs (a 2 ms sampling thread):
    ``with PeakRss() as peak: fn()`` then ``peak.delta_mib``. Measures what the block
    allocates on top of what the process already holds (weights, compiled code)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.delta_mib = 0.0

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._start = self._peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.delta_mib = (self._peak - self._start) / MIB


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[Timing, float]:
    """(Timing of ``repeats`` calls after ``warmup`` untimed ones, peak RSS delta MiB of the
    timed calls). ``fn`` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    with PeakRss() as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return Timing(times), peak.delta_mib


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, tuple[Timing, float]]:
    """``time_calls`` for several callables taking turns: round r calls every one of them once
    (in an order rotated by r), so a slow drift of the machine's speed (a shared host) moves
    every side alike and leaves their ratios alone. Returns {name: (Timing, peak RSS delta MiB
    over its calls)}; each callable gets ``warmup`` untimed calls first."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks = dict.fromkeys(names, 0.0)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with PeakRss() as peak:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak.delta_mib)
    return {name: (Timing(times[name]), peaks[name]) for name in names}


def compile_twice(jitted, *args) -> tuple[Any, dict[str, float]]:
    """Compiles ``jitted`` for ``args`` twice: once as a first run does, once more from a
    fresh lowering, which the persistent compilation cache serves (what a second run of the
    benchmark pays). Returns (compiled, {"compile_s", "compile_cached_s"})."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    first = time.perf_counter() - start
    jax.clear_caches()  # drop the in-memory copy: the next compile reads the persistent cache
    start = time.perf_counter()
    jitted.lower(*args).compile()
    second = time.perf_counter() - start
    return compiled, {"compile_s": first, "compile_cached_s": second}


def compiled_memory_mib(compiled) -> dict[str, float]:
    """XLA's memory analysis of a compiled program, MiB: arguments, outputs, temporaries and
    their peak (args + out - alias + temp)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    args = stats.argument_size_in_bytes / MIB
    out = stats.output_size_in_bytes / MIB
    alias = stats.alias_size_in_bytes / MIB
    temp = stats.temp_size_in_bytes / MIB
    return {"args_mib": args, "temp_mib": temp, "peak_mib": args + out - alias + temp}


def compiled_flops(compiled) -> float:
    """FLOPs XLA counts for one call of a compiled program (0 when it does not say)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


# --------------------------------------------------------------------------------------------
# Models: ours (random init) and the torch reference with the same weights.


def torch_reference():
    """``tests/torch_reference.py`` (the original PhraseVAE / PhraseLDM as torch modules)."""
    tests_dir = os.path.join(REPO_ROOT, "tests")
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    import torch_reference

    return torch_reference


@dataclasses.dataclass
class LdmPair:
    """The length-conditioned PhraseLDM on both sides with the same weights."""

    config: Any  # PhraseLDMConfig (float32 compute)
    params: Any  # ours, on device
    torch_model: Any  # torch_reference.ReferencePhraseLDM
    num_params: int


@dataclasses.dataclass
class VaePair:
    """A stage-3 PhraseVAE on both sides with the same weights."""

    config: Any  # PhraseVAEConfig
    params: Any
    torch_model: Any  # torch_reference.ReferencePhraseVAE
    num_params: int
    source: str


def ldm_dit_config(quick: bool) -> dict:
    """The DiT sizes: the paper's (``configs/ldm_lencond.py``) or a tiny one for ``--quick``."""
    from configs import ldm_common

    config = ldm_common.ldm_config(True, False, "")
    dit = dict(config.model.dit)
    if quick:
        dit.update(
            sample_size=32,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            num_key_value_attention_heads=2,
            cross_attention_dim=16,
            time_proj_dim=16,
            global_states_input_dim=16,
            cross_attention_input_dim=16,
        )
    return dit


@functools.cache
def ldm_pair(quick: bool, seed: int = 0) -> LdmPair:
    """Random-init length-conditioned PhraseLDM (paper size unless ``quick``), exported with
    ``convert.export_phrase_ldm`` and read back by the torch reference's ``from_pretrained``."""
    from phraseldm_jax import dit, ldm
    from phraseldm_jax.convert import api

    ref = torch_reference()
    dit_cfg = dit.DiTConfig(**{k: v for k, v in ldm_dit_config(quick).items() if k != "remat"})
    config = ldm.PhraseLDMConfig(
        dit=dit_cfg,
        length_control=True,
        scale_factor=ref.REFERENCE_SCALE_FACTOR,
        clip_range=ref.REFERENCE_CLIP_RANGE,
        cross_bias_mode="additive",
    )
    params = ldm.init_params(jax.random.PRNGKey(seed), config)
    loaded = api.LoadedPhraseLDM(config, params)
    with tempfile.TemporaryDirectory() as folder:
        api.export_phrase_ldm(loaded, folder)
        torch_model = ref.ReferencePhraseLDM.from_pretrained(folder, strict=True).eval()
    return LdmPair(config, jax.device_put(loaded.params), torch_model, trees.param_count(params))


def torch_ldm_forward(torch_model, x, t, n_bars):
    """The reference length-conditioned PhraseLDM's noise prediction as torch tensors, with
    gradients when enabled (``ReferencePhraseLDM.predict_noise`` without numpy): x [batch,
    length, 64] float, t and n_bars [batch] int64 -> [batch, length, 64] float32."""
    import torch
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cfg = torch_model.ldm.config
    batch, length, _ = x.shape
    global_states = torch_model.length_encoder(n_bars)
    context = torch.zeros(batch, 7, cfg.cross_attention_input_dim)
    rotary = get_1d_rotary_pos_embed(
        cfg.attention_head_dim // 2, length + 1, use_real=True, repeat_interleave_real=False
    )
    out = torch_model.ldm(
        x.transpose(1, 2),
        t,
        encoder_hidden_states=context,
        global_hidden_states=global_states,
        rotary_embedding=rotary,
    ).sample
    return out.transpose(1, 2).float()


def vae_model_config(quick: bool):
    """Stage-3 PhraseVAE sizes: the paper's (``configs/vae_stage3.py``) or tiny for ``--quick``."""
    from configs import vae_common
    from phraseldm_jax import vae as vae_lib

    model = vae_common.vae_config(3).model.to_dict()
    model["t5"] = {k: v for k, v in model["t5"].items() if k not in ("dtype", "remat")}
    if quick:
        model["t5"].update(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1)
        model["t5"]["num_decoder_layers"] = 1
    return vae_lib.PhraseVAEConfig(**model)


def _vae_pair_from_loaded(loaded, source: str) -> VaePair:
    from phraseldm_jax.convert import api

    ref = torch_reference()
    with tempfile.TemporaryDirectory() as folder:
        api.export_phrase_vae(loaded, folder)
        torch_model = ref.ReferencePhraseVAE.from_pretrained(folder, strict=True).eval()
    return VaePair(
        loaded.config,
        jax.device_put(loaded.params),
        torch_model,
        trees.param_count(loaded.params),
        source,
    )


@functools.cache
def vae_pair(quick: bool, seed: int = 0) -> VaePair:
    """Random-init stage-3 PhraseVAE (paper size unless ``quick``) on both sides."""
    from phraseldm_jax import vae as vae_lib
    from phraseldm_jax.convert import api

    config = vae_model_config(quick)
    params = vae_lib.init_params(jax.random.PRNGKey(seed), config)
    return _vae_pair_from_loaded(api.LoadedPhraseVAE(config, params), "random init")


def trained_ldm_pair(workdir: str) -> LdmPair:
    """A trained PhraseLDM workdir on both sides (its latest checkpoint)."""
    from phraseldm_jax.convert import api

    loaded = api.load_workdir(workdir, which="latest")
    with tempfile.TemporaryDirectory() as folder:
        api.export_phrase_ldm(loaded, folder)
        torch_model = torch_reference().ReferencePhraseLDM.from_pretrained(folder, strict=True)
    return LdmPair(
        loaded.config,
        jax.device_put(loaded.params),
        torch_model.eval(),
        trees.param_count(loaded.params),
    )


def trained_vae_pair(workdir: str) -> VaePair:
    """A trained PhraseVAE workdir on both sides."""
    from phraseldm_jax.convert import api

    return _vae_pair_from_loaded(api.load_workdir(workdir), os.path.abspath(workdir))


# --------------------------------------------------------------------------------------------
# Output.


def write_json(path: str, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically (temp file + os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get 3 significant digits (more for large values)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
