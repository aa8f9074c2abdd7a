"""Where each expert lives: the `Placement` type every solver returns, and the GPU `Topology`.

A placement is a physical-to-logical map `phy2log [layers, slots]` (the layout vLLM's EPLB state and
SGLang's `--init-expert-location` use): physical slot s of MoE layer l holds logical expert
`phy2log[l, s]`, and slot s lives on GPU `s // slots_per_gpu`. A logical expert may occupy several
slots (replicas of a hot expert). -1 marks an empty slot: MoETuner without the "equal experts per
GPU" constraint may give a GPU 3 experts in one layer and 1 in the next; such placements run in
llmsys but no engine can load them (see `llmsys.moe.export`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmsys.moe.errors import InfeasiblePlacementError, PlacementConstraintError

#: default link bandwidths (GB/s per direction per GPU): NVLink 4 inside an H100 node, 400 Gb/s
#: InfiniBand NDR (50 GB/s) between nodes
NVLINK_GBPS = 450.0
NETWORK_GBPS = 50.0


@dataclass(frozen=True)
class Topology:
    """GPUs in nodes, as a bandwidth matrix `bandwidth[g1, g2]` (GB/s; the diagonal is unused)."""

    bandwidth: np.ndarray
    gpus_per_node: int

    def __post_init__(self) -> None:
        bw = np.asarray(self.bandwidth, dtype=float)
        if bw.ndim != 2 or bw.shape[0] != bw.shape[1]:
            raise ValueError(f"bandwidth must be a square [gpus, gpus] matrix, got shape {bw.shape}")
        off = ~np.eye(bw.shape[0], dtype=bool)
        if (bw[off] <= 0).any():
            raise ValueError("every off-diagonal bandwidth must be > 0 (GB/s)")
        if self.gpus_per_node < 1 or bw.shape[0] % self.gpus_per_node:
            raise ValueError(f"{bw.shape[0]} GPUs cannot be split into nodes of {self.gpus_per_node}")
        object.__setattr__(self, "bandwidth", bw)

    @classmethod
    def make(
        cls,
        num_gpus: int,
        num_nodes: int = 1,
        intra_node_gbps: float = NVLINK_GBPS,
        inter_node_gbps: float = NETWORK_GBPS,
    ) -> Topology:
        """`num_gpus` GPUs spread evenly over `num_nodes` nodes (GPU g in node g // gpus_per_node)."""
        if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
            raise ValueError(f"num_gpus={num_gpus} must be a positive multiple of num_nodes={num_nodes}")
        per_node = num_gpus // num_nodes
        node = np.arange(num_gpus) // per_node
        bw = np.where(node[:, None] == node[None, :], intra_node_gbps, inter_node_gbps).astype(float)
        return cls(bw, per_node)

    @property
    def num_gpus(self) -> int:
        return self.bandwidth.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    @property
    def cost(self) -> np.ndarray:
        """Bandwidth-normalised cost of one unit of traffic on each link: max_bw / bw, 0 on the diagonal."""
        off = ~np.eye(self.num_gpus, dtype=bool)
        top = self.bandwidth[off].max() if self.num_gpus > 1 else 1.0
        return np.where(off, top / self.bandwidth, 0.0)

    @property
    def is_node_uniform(self) -> bool:
        """True when the matrix is exactly `make(...)`'s two-level shape (so GPUs are interchangeable
        up to node structure, which lets the ILP fix one cluster's GPU to break symmetry)."""
        node = np.arange(self.num_gpus) // self.gpus_per_node
        same = node[:, None] == node[None, :]
        off = ~np.eye(self.num_gpus, dtype=bool)
        intra, inter = self.bandwidth[same & off], self.bandwidth[~same]
        return (intra.size == 0 or np.ptp(intra) == 0) and (inter.size == 0 or np.ptp(inter) == 0)

    def to_dict(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth.tolist(), "gpus_per_node": self.gpus_per_node}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        return cls(np.asarray(data["bandwidth"], dtype=float), int(data["gpus_per_node"]))


def as_topology(topology: Topology | int) -> Topology:
    """A Topology, or a single-node one of that many GPUs."""
    return topology if isinstance(topology, Topology) else Topology.make(int(topology))


@dataclass
class Placement:
    """Expert-to-GPU placement of every MoE layer: `phy2log [layers, slots]`, -1 = empty slot."""

    phy2log: np.ndarray
    num_experts: int
    topology: Topology
    meta: dict[str, Any] = field(default_factory=dict)  # solver name, solve time, MIP gap, ...

    def __post_init__(self) -> None:
        p = np.asarray(self.phy2log)
        if p.ndim != 2:
            raise ValueError(f"phy2log must be [layers, slots], got shape {p.shape}")
        self.phy2log = p.astype(np.int64)  # a copy, made read-only: the dispatch caches below rely on it
        self.phy2log.flags.writeable = False
        G, S = self.topology.num_gpus, p.shape[1]
        if S % G:
            raise PlacementConstraintError(
                f"{S} slots per layer cannot be split evenly over {G} GPUs: use a multiple of {G} slots "
                f"(e.g. {(-(-S // G)) * G}) so every GPU holds the same number of slots"
            )
        if ((p < -1) | (p >= self.num_experts)).any():
            raise ValueError(f"phy2log entries must be logical expert ids in [0, {self.num_experts}) or -1")
        for l in range(p.shape[0]):
            missing = np.setdiff1d(np.arange(self.num_experts), p[l])
            if missing.size:
                raise InfeasiblePlacementError(
                    f"layer {l}: experts {missing.tolist()} have no slot, so their tokens could not be "
                    "served; every logical expert needs at least one slot (more slots, or fix the map)"
                )

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    def gpu_of_slot(self) -> np.ndarray:
        return np.arange(self.num_slots) // self.slots_per_gpu

    # -- views -----------------------------------------------------------------------------------
    def experts_per_gpu(self) -> np.ndarray:
        """[layers, gpus] number of occupied slots on each GPU."""
        occupied = (self.phy2log >= 0).reshape(self.num_layers, self.num_gpus, self.slots_per_gpu)
        return occupied.sum(axis=2)

    def is_equal_per_gpu(self) -> bool:
        """Every slot occupied (hence the same number of experts on every GPU in every layer)."""
        return bool((self.phy2log >= 0).all())

    def replica_counts(self) -> np.ndarray:
        """logcnt [layers, experts]: slots holding each logical expert."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for l in range(self.num_layers):
            row = self.phy2log[l]
            out[l] = np.bincount(row[row >= 0], minlength=self.num_experts)
        return out

    def log2phy(self) -> np.ndarray:
        """[layers, experts, max_replicas]: the slots of each logical expert, ascending, -1 padded."""
        cnt = self.replica_counts()
        out = np.full((self.num_layers, self.num_experts, max(int(cnt.max()), 1)), -1, dtype=np.int64)
        for l in range(self.num_layers):
            fill = np.zeros(self.num_experts, dtype=np.int64)
            for s, e in enumerate(self.phy2log[l]):
                if e >= 0:
                    out[l, e, fill[e]] = s
                    fill[e] += 1
        return out

    def gpu_share(self) -> np.ndarray:
        """[layers, experts, gpus]: fraction of expert e's tokens served by each GPU, splitting evenly over
        its replicas (the expectation of `dispatch_ranks`' round-robin choice)."""
        share = np.zeros((self.num_layers, self.num_experts, self.num_gpus))
        gpu = self.gpu_of_slot()
        for l in range(self.num_layers):
            row = self.phy2log[l]
            ok = row >= 0
            np.add.at(share[l], (row[ok], gpu[ok]), 1.0)
        return share / share.sum(axis=2, keepdims=True)

    def gpus_of_expert(self, layer: int) -> list[list[int]]:
        """For each logical expert of `layer`, the GPU of each of its slots (ascending slot order)."""
        gpu = self.gpu_of_slot()
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, e in enumerate(self.phy2log[layer]):
            if e >= 0:
                out[e].append(int(gpu[s]))
        return out

    def dispatch_ranks(
        self, layer: int, experts: np.ndarray, home: int | np.ndarray, token_ids: np.ndarray
    ) -> np.ndarray:
        """Which GPU serves each routed (token, expert) entry of `layer`, for tokens living on GPU `home`.

        The rule (shared by the expert-parallel runtime and the traffic predictor, so that predicted
        bytes are exact): a replica on the home GPU if there is one, else the replica with index
        `token_id % replicas` in slot order (round-robin over replicas). `experts` is [N, k] (-1 = none),
        `home` one GPU or [N] (one per token), `token_ids` [N] the token's index among its home GPU's
        tokens. Returns [N, k] (-1 where there is no expert).
        """
        log2phy = self._log2phy_cache()[layer]  # [E, R]
        cnt = self._replica_cache()[layer]  # [E]
        gpu = self.gpu_of_slot()
        experts = np.asarray(experts)
        valid = experts >= 0
        e = np.where(valid, experts, 0)
        pick = np.asarray(token_ids)[:, None] % cnt[e]
        ranks = gpu[log2phy[e, pick]]
        home = np.asarray(home)
        home = home[:, None] if home.ndim else home
        local = self._local_cache()[layer][home, e]  # the expert has a replica on the token's home GPU
        ranks = np.where(local, home, ranks)
        return np.where(valid, ranks, -1)

    # small caches: dispatch_ranks runs once per MoE layer call in the EP runtime
    def _log2phy_cache(self) -> np.ndarray:
        if "_log2phy" not in self.__dict__:
            self.__dict__["_log2phy"] = self.log2phy()
        return self.__dict__["_log2phy"]

    def _replica_cache(self) -> np.ndarray:
        if "_logcnt" not in self.__dict__:
            self.__dict__["_logcnt"] = self.replica_counts()
        return self.__dict__["_logcnt"]

    def _local_cache(self) -> np.ndarray:
        if "_local" not in self.__dict__:
            local = np.zeros((self.num_layers, self.num_gpus, self.num_experts), dtype=bool)
            gpu = self.gpu_of_slot()
            for l in range(self.num_layers):
                row = self.phy2log[l]
                ok = row >= 0
                local[l, gpu[ok], row[ok]] = True
            self.__dict__["_local"] = local
        return self.__dict__["_local"]

    # -- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "llmsys.moe.Placement/1",
            "physical_to_logical_map": self.phy2log.tolist(),
            "num_experts": self.num_experts,
            "topology": self.topology.to_dict(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        if "physical_to_logical_map" not in data or "topology" not in data:
            raise ValueError("not a llmsys placement (needs 'physical_to_logical_map' and 'topology')")
        return cls(
            np.asarray(data["physical_to_logical_map"]),
            int(data["num_experts"]),
            Topology.from_dict(data["topology"]),
            dict(data.get("meta", {})),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), default=_json_default))
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> Placement:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def load_placement(path: str | Path) -> Placement:
    """Read a placement written by `Placement.save`."""
    return Placement.from_file(path)


def placement_from_assignment(
    assign: np.ndarray, topology: Topology, slots_per_gpu: int | None = None, meta: dict | None = None
) -> Placement:
    """Build a Placement from expert -> GPU assignments `assign [layers, experts]` (no replicas).

    Slots are filled GPU by GPU in ascending expert order; GPUs holding fewer experts than
    `slots_per_gpu` (default: the most any GPU holds) get -1 (empty) slots.
    """
    assign = np.asarray(assign)
    L, E = assign.shape
    G = topology.num_gpus
    counts = np.stack([np.bincount(assign[l], minlength=G) for l in range(L)])
    n = int(counts.max()) if slots_per_gpu is None else slots_per_gpu
    if counts.max() > n:
        raise InfeasiblePlacementError(f"a GPU holds {counts.max()} experts but only {n} slots were allowed")
    phy = np.full((L, G * n), -1, dtype=np.int64)
    for l in range(L):
        for g in range(G):
            members = np.flatnonzero(assign[l] == g)
            phy[l, g * n : g * n + members.size] = members
    return Placement(phy, E, topology, dict(meta or {}))
