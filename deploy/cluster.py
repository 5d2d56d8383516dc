"""The cluster spec: which workers a deployment runs, and with which flags.

A :class:`ClusterSpec` names one model and a list of worker pools (prefill, decode or
both), each with a worker count, a tensor-parallel size and the Ray resources one TP
rank needs. Everything that must agree between workers (dtype, KV block size, transfer
backend) is cluster-wide; the KV cache size may be set per pool (decode pools usually
want more blocks than prefill pools).

The spec only ever speaks the worker runner's command line: :meth:`ClusterSpec.worker_args`
turns (pool, index) into the exact flags ``python -m pdserve.<role>_worker`` accepts
(``pdserve.deploy.runner.build_parser(role)``), and every extra flag a spec carries is
checked against that parser when the spec is built, so a spec cannot name a flag the
runner does not take. The Ray launcher (:mod:`pdserve.deploy.ray_launcher`) runs
``runner.serve`` with those same flags inside an actor.

YAML form (``ClusterSpec.from_yaml``; a relative ``model`` is relative to the file)::

    model: ./tiny-llama
    dtype: float32            # float32 | bfloat16 | float16
    block_size: 16
    num_kv_blocks: 256        # or kv_cache_memory: <bytes per rank>; neither: runner default
    transfer_backend: torch_dist   # nixl | torch_dist (what the runner's --transfer-backend takes)
    heartbeat_ttl: 10
    store: redis://10.0.0.2:6379   # optional; the launcher's store URL wins
    extra_args: [--log-level, WARNING]   # runner flags for every worker
    pools:
      - role: prefill
        count: 1
        tp_size: 1
        resources: {CPU: 1}   # per TP rank; {GPU: 1} on GPU nodes
      - role: decode
        name: decode          # worker ids are <name>-<index>; default: the role
        count: 2
        num_kv_blocks: 1024   # overrides the cluster-wide KV size for this pool
        extra_args: [--max-num-seqs, "64"]
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping

ROLES = ("prefill", "decode", "both")


def runner_choices(flag: str) -> tuple[str, ...]:
    """The values the worker runner accepts for ``flag`` (e.g. ``--dtype``): the runner's
    parser is the one authority, so the spec never drifts from it."""
    from pdserve.deploy.runner import build_parser  # noqa: PLC0415 - pulls in the engine

    for action in build_parser("decode")._actions:
        if flag in action.option_strings:
            return tuple(action.choices or ())
    raise KeyError(f"the worker runner has no {flag} flag")

#: Runner flags the spec sets itself; extra_args may not repeat them (the spec's own
#: fields say these things, and a second spelling would silently override one of them).
MANAGED_FLAGS = frozenset({
    "--role", "--model", "--store", "--worker-id", "--port", "--tensor-parallel-size", "--tp", "--dtype",
    "--block-size", "--num-kv-blocks", "--kv-cache-memory", "--transfer-backend", "--heartbeat-ttl",
})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_POOL_KEYS = frozenset({
    "role", "name", "count", "tp_size", "resources", "num_kv_blocks", "kv_cache_memory", "extra_args",
})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_kv_size(where: str, num_kv_blocks: Any, kv_cache_memory: Any) -> None:
    if num_kv_blocks is not None and (not _is_int(num_kv_blocks) or num_kv_blocks < 1):
        raise ValueError(f"{where}num_kv_blocks must be a positive integer, got {num_kv_blocks!r}")
    if kv_cache_memory is not None and (not _is_int(kv_cache_memory) or kv_cache_memory < 1):
        raise ValueError(f"{where}kv_cache_memory must be a positive integer (bytes per rank), got {kv_cache_memory!r}")
    if num_kv_blocks is not None and kv_cache_memory is not None:
        raise ValueError(
            f"{where}set num_kv_blocks ({num_kv_blocks}) or kv_cache_memory ({kv_cache_memory}), not both"
        )


def _check_extra_args(where: str, extra_args: Any) -> tuple[str, ...]:
    if isinstance(extra_args, (str, bytes)) or not isinstance(extra_args, Iterable):
        raise ValueError(f"{where}extra_args must be a list of strings, got {extra_args!r}")
    args = tuple(extra_args)
    for a in args:
        if not isinstance(a, str):
            raise ValueError(f"{where}extra_args must be a list of strings, got {a!r} in {list(args)!r}")
        flag = a.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise ValueError(f"{where}extra_args may not set {flag}: the cluster spec sets it (use the spec's field)")
    return args


@dataclass(frozen=True)
class PoolSpec:
    """``count`` workers of one role, each a TP group of ``tp_size`` ranks."""

    role: str
    count: int = 1
    tp_size: int = 1
    #: Ray resources one TP rank needs, e.g. ``{"CPU": 1}`` or ``{"GPU": 1, "CPU": 2}``.
    #: A worker reserves ``tp_size`` bundles of these on one node.
    resources: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1}, hash=False)
    #: Worker ids are ``<name>-<index>``; default: the role.
    name: str | None = None
    #: Override the cluster-wide KV size for this pool (at most one of the two).
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    #: Runner flags for this pool's workers only (after the cluster-wide extra_args).
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"pool role must be one of {', '.join(ROLES)}, got {self.role!r}")
        name = self.role if self.name is None else self.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"pool name must be letters, digits, '_', '.', '-' (not first), got {name!r}")
        object.__setattr__(self, "name", name)
        where = f"pool {name!r}: "
        if not _is_int(self.count) or self.count < 0:
            raise ValueError(f"{where}count must be an integer >= 0, got {self.count!r}")
        if not _is_int(self.tp_size) or self.tp_size < 1:
            raise ValueError(f"{where}tp_size must be an integer >= 1, got {self.tp_size!r}")
        if not isinstance(self.resources, Mapping) or not self.resources:
            raise ValueError(f"{where}resources must be a non-empty mapping like {{'CPU': 1}}, got {self.resources!r}")
        res: dict[str, float] = {}
        for k, v in self.resources.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"{where}resource names must be non-empty strings, got {k!r}")
            if not _is_number(v) or v <= 0:
                raise ValueError(f"{where}resource {k!r} must be a positive number, got {v!r}")
            res[k] = v
        object.__setattr__(self, "resources", MappingProxyType(res))
        _check_kv_size(where, self.num_kv_blocks, self.kv_cache_memory)
        object.__setattr__(self, "extra_args", _check_extra_args(where, self.extra_args))

    def bundles(self) -> list[dict[str, float]]:
        """The placement-group bundles of one worker: one per TP rank."""
        return [dict(self.resources) for _ in range(self.tp_size)]

    def worker_id(self, index: int) -> str:
        return f"{self.name}-{index}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "name": self.name, "count": self.count, "tp_size": self.tp_size,
                             "resources": dict(self.resources)}
        if self.num_kv_blocks is not None:
            d["num_kv_blocks"] = self.num_kv_blocks
        if self.kv_cache_memory is not None:
            d["kv_cache_memory"] = self.kv_cache_memory
        if self.extra_args:
            d["extra_args"] = list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PoolSpec":
        if not isinstance(d, Mapping):
            raise ValueError(f"a pool must be a mapping, got {d!r}")
        unknown = sorted(set(d) - _POOL_KEYS)
        if unknown:
            raise ValueError(f"unknown pool key(s) {unknown}; known: {sorted(_POOL_KEYS)}")
        if "role" not in d:
            raise ValueError(f"a pool needs a role ({', '.join(ROLES)}): {dict(d)!r}")
        kw = dict(d)
        if "extra_args" in kw and kw["extra_args"] is not None:
            kw["extra_args"] = _check_extra_args(f"pool {kw.get('name', kw['role'])!r}: ", kw["extra_args"])
        elif "extra_args" in kw:
            kw["extra_args"] = ()
        return cls(**kw)


_SPEC_KEYS = frozenset({
    "model", "pools", "dtype", "block_size", "num_kv_blocks", "kv_cache_memory", "transfer_backend",
    "heartbeat_ttl", "store", "extra_args",
})


@dataclass(frozen=True)
class ClusterSpec:
    """One model served by pools of workers. Validated on construction (ValueError)."""

    model: str
    pools: tuple[PoolSpec, ...]
    dtype: str = "float32"
    block_size: int = 16
    #: KV cache size of every worker (a pool may override): blocks, or bytes per rank.
    #: Neither: the runner's default (--kv-cache-memory 512 MiB).
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    transfer_backend: str = "nixl"
    heartbeat_ttl: float = 10.0
    #: Control-plane store URL (redis://... or grpc://host:port); the launcher's wins.
    store: str | None = None
    #: Runner flags for every worker (e.g. ``["--log-level", "WARNING"]``).
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a model directory path, got {self.model!r}")
        pools = self.pools
        if isinstance(pools, (PoolSpec, str, bytes, Mapping)) or not isinstance(pools, Iterable):
            raise ValueError(f"pools must be a list of pools, got {pools!r}")
        pools = tuple(PoolSpec.from_dict(p) if isinstance(p, Mapping) else p for p in pools)
        for p in pools:
            if not isinstance(p, PoolSpec):
                raise ValueError(f"pools must hold PoolSpec objects or mappings, got {p!r}")
        if not pools:
            raise ValueError("pools must not be empty: name at least one decode (or both) pool")
        names = [p.name for p in pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pool names must be unique (worker ids derive from them), duplicated: {dup}")
        if not any(p.role in ("decode", "both") and p.count > 0 for p in pools):
            raise ValueError(
                f"the cluster needs at least one decode or both worker to serve requests; pools: "
                f"{[(p.name, p.role, p.count) for p in pools]}"
            )
        object.__setattr__(self, "pools", pools)
        dtypes = runner_choices("--dtype")
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {self.dtype!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        _check_kv_size("", self.num_kv_blocks, self.kv_cache_memory)
        backends = runner_choices("--transfer-backend")
        if self.transfer_backend not in backends:
            raise ValueError(f"transfer_backend must be one of {', '.join(backends)}, got {self.transfer_backend!r}")
        if not _is_number(self.heartbeat_ttl) or self.heartbeat_ttl <= 0:
            raise ValueError(f"heartbeat_ttl must be a positive number of seconds, got {self.heartbeat_ttl!r}")
        if self.store is not None and (not isinstance(self.store, str) or "://" not in self.store):
            raise ValueError(f"store must be a URL (redis://..., grpc://host:port), got {self.store!r}")
        object.__setattr__(self, "extra_args", _check_extra_args("", self.extra_args))
        # The runner's parser is the authority on flags: parse one worker of every pool.
        for p in pools:
            self._parse(p, self.worker_args(p, 0, store_url=self.store or "grpc://127.0.0.1:1"))

    # ------------------------------------------------------------------ queries

    def pool(self, name: str) -> PoolSpec:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool named {name!r}; pools: {[p.name for p in self.pools]}")

    def workers(self) -> Iterator[tuple[PoolSpec, int]]:
        """Every (pool, index) the spec runs, pool by pool."""
        for p in self.pools:
            for i in range(p.count):
                yield p, i

    def num_workers(self) -> int:
        return sum(p.count for p in self.pools)

    def total_resources(self) -> dict[str, float]:
        """Resources all workers need together (sum over workers of tp_size x per-rank)."""
        total: dict[str, float] = {}
        for p in self.pools:
            for k, v in p.resources.items():
                total[k] = total.get(k, 0) + v * p.tp_size * p.count
        return total

    def worker_args(self, pool: PoolSpec | str | int, index: int, *, store_url: str | None = None) -> list[str]:
        """The runner flags of worker ``index`` of ``pool`` (a PoolSpec, pool name or position).

        Parses with ``pdserve.deploy.runner.build_parser(pool.role)`` (no ``--role``;
        the role is the program: ``python -m pdserve.<role>_worker``).
        """
        p = self._resolve_pool(pool)
        if not _is_int(index) or index < 0:
            raise ValueError(f"worker index must be an integer >= 0, got {index!r}")
        url = store_url or self.store
        if not url:
            raise ValueError("no control-plane store URL: pass store_url or set the spec's store")
        num_blocks, kv_mem = (p.num_kv_blocks, p.kv_cache_memory)
        if num_blocks is None and kv_mem is None:
            num_blocks, kv_mem = self.num_kv_blocks, self.kv_cache_memory
        args = [
            "--model", self.model,
            "--store", url,
            "--worker-id", p.worker_id(index),
            "--tensor-parallel-size", str(p.tp_size),
            "--dtype", self.dtype,
            "--block-size", str(self.block_size),
            "--transfer-backend", self.transfer_backend,
            "--heartbeat-ttl", repr(float(self.heartbeat_ttl)),
        ]
        if num_blocks is not None:
            args += ["--num-kv-blocks", str(num_blocks)]
        if kv_mem is not None:
            args += ["--kv-cache-memory", str(kv_mem)]
        return args + list(self.extra_args) + list(p.extra_args)

    def _resolve_pool(self, pool: PoolSpec | str | int) -> PoolSpec:
        if isinstance(pool, PoolSpec):
            if pool not in self.pools:
                raise ValueError(f"pool {pool.name!r} is not part of this spec")
            return pool
        if isinstance(pool, str):
            return self.pool(pool)
        if _is_int(pool) and 0 <= pool < len(self.pools):
            return self.pools[pool]
        raise ValueError(f"no pool {pool!r}: give a PoolSpec, a pool name or a position < {len(self.pools)}")

    @staticmethod
    def _parse(pool: PoolSpec, argv: list[str]):
        from pdserve.deploy.runner import build_parser  # noqa: PLC0415 - pulls in the engine

        parser = build_parser(pool.role)

        def error(message: str):
            raise ValueError(f"pool {pool.name!r}: the worker runner rejects the flags {argv!r}: {message}")

        parser.error = error  # type: ignore[method-assign] - argparse would sys.exit
        return parser.parse_args(argv)

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "dtype": self.dtype, "block_size": self.block_size,
                             "transfer_backend": self.transfer_backend, "heartbeat_ttl": self.heartbeat_ttl}
        if self.num_kv_blocks is not None:
            d["num_kv_blocks"] = self.num_kv_blocks
        if self.kv_cache_memory is not None:
            d["kv_cache_memory"] = self.kv_cache_memory
        if self.store is not None:
            d["store"] = self.store
        if self.extra_args:
            d["extra_args"] = list(self.extra_args)
        d["pools"] = [p.to_dict() for p in self.pools]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> "ClusterSpec":
        """Build from a plain mapping (unknown keys are errors). A relative ``model`` is
        resolved against ``base_dir`` when given."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a cluster spec must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown cluster spec key(s) {unknown}; known: {sorted(_SPEC_KEYS)}")
        for key in ("model", "pools"):
            if key not in d:
                raise ValueError(f"a cluster spec needs {key!r}")
        kw = dict(d)
        model = kw["model"]
        if base_dir is not None and isinstance(model, str) and model and not Path(model).is_absolute():
            kw["model"] = str(Path(base_dir) / model)
        pools = kw["pools"]
        if not isinstance(pools, list):
            raise ValueError(f"pools must be a list, got {pools!r}")
        kw["pools"] = tuple(PoolSpec.from_dict(p) for p in pools)
        if kw.get("extra_args") is None:
            kw.pop("extra_args", None)
        if isinstance(kw.get("heartbeat_ttl"), int) and not isinstance(kw["heartbeat_ttl"], bool):
            kw["heartbeat_ttl"] = float(kw["heartbeat_ttl"])
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ClusterSpec":
        import yaml  # noqa: PLC0415

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The YAML text of the spec; also written to ``path`` when given."""
        import yaml  # noqa: PLC0415

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text
