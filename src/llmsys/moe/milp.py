"""One small front end to the HiGHS MIP solver, with time limits, warm starts and the MIP gap.

Backends, in the order `backend="auto"` tries them:
- "highspy": the HiGHS Python package, if installed: real warm starts (`setSolution`).
- "scipy-highs": the same HiGHS bindings that SciPy >= 1.15 ships inside `scipy.optimize._highspy`
  (a private module; used only when importable, with the same API as highspy): real warm starts.
- "milp": `scipy.optimize.milp` (public API). It cannot take an initial solution, so a warm start is
  emulated: the caller's incumbent is returned whenever HiGHS does not find a better one in time.
Whatever the backend, the returned solution is never worse than the warm start.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from scipy import sparse

log = logging.getLogger(__name__)

BACKENDS = ("highspy", "scipy-highs", "milp")


@dataclass
class MILPResult:
    """A minimisation result. `gap` = (objective - bound) / |objective| (0 when proven optimal)."""

    x: np.ndarray | None
    objective: float | None
    bound: float | None
    gap: float | None
    status: str  # "optimal", "time_limit", "infeasible", "warm_start" (kept the incumbent), ...
    seconds: float
    backend: str
    warm_started: bool


def _bindings(backend: str) -> ModuleType | None:
    try:
        if backend == "highspy":
            return importlib.import_module("highspy")
        if backend == "scipy-highs":
            return importlib.import_module("scipy.optimize._highspy._core")
    except ImportError:
        return None
    return None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if b == "milp" or _bindings(b) is not None]


def _gap(obj: float | None, bound: float | None) -> float | None:
    if obj is None or bound is None or not np.isfinite(bound):
        return None
    return max(0.0, (obj - bound) / max(abs(obj), 1e-12))


def solve_milp(
    c: np.ndarray,
    A: sparse.spmatrix | sparse.sparray,
    row_lower: np.ndarray,
    row_upper: np.ndarray,
    col_lower: np.ndarray,
    col_upper: np.ndarray,
    integer: np.ndarray,
    *,
    time_limit: float = 60.0,
    mip_rel_gap: float = 0.025,
    warm_start: np.ndarray | None = None,
    backend: str = "auto",
) -> MILPResult:
    """min c @ x  s.t.  row_lower <= A @ x <= row_upper,  col_lower <= x <= col_upper, x[integer] integral."""
    if backend == "auto":
        backend = next(b for b in BACKENDS if b == "milp" or _bindings(b) is not None)
    if backend not in BACKENDS:
        raise ValueError(f"unknown MILP backend {backend!r}; one of {('auto', *BACKENDS)}")
    c = np.asarray(c, dtype=float)
    if warm_start is not None:
        warm_start = np.asarray(warm_start, dtype=float)
        if warm_start.shape != c.shape:
            raise ValueError(f"warm start has {warm_start.size} values for {c.size} variables")
    if warm_start is not None and not _feasible(warm_start, A, row_lower, row_upper, col_lower, col_upper, integer):
        log.debug("warm start violates the constraints; solving without it")
        warm_start = None
    start = time.perf_counter()
    if backend == "milp":
        result = _solve_scipy_milp(c, A, row_lower, row_upper, col_lower, col_upper, integer, time_limit, mip_rel_gap)
    else:
        module = _bindings(backend)
        if module is None:
            raise ImportError(f"MILP backend {backend!r} is not installed (pip install highspy, or use 'milp')")
        result = _solve_highs(
            module,
            c,
            A,
            row_lower,
            row_upper,
            col_lower,
            col_upper,
            integer,
            time_limit,
            mip_rel_gap,
            warm_start,
        )
    result.seconds = time.perf_counter() - start
    result.backend = backend
    if warm_start is not None:
        warm_obj = float(c @ warm_start)
        if result.x is None or result.objective is None or result.objective > warm_obj - 1e-9:
            # HiGHS found nothing strictly better in time: keep the incumbent (callers put tie-breaks
            # the objective does not see into it), with HiGHS's bound if it has one
            result.x, result.objective = warm_start, warm_obj
            result.gap = _gap(warm_obj, result.bound)
            result.status = "warm_start" if result.status != "optimal" else "optimal"
    return result


def _feasible(x, A, row_lower, row_upper, col_lower, col_upper, integer, tol: float = 1e-6) -> bool:
    Ax = A @ x
    integral = np.abs(x[integer] - np.round(x[integer])) <= tol
    return bool(
        (Ax >= np.asarray(row_lower) - tol).all()
        and (Ax <= np.asarray(row_upper) + tol).all()
        and (x >= np.asarray(col_lower) - tol).all()
        and (x <= np.asarray(col_upper) + tol).all()
        and integral.all()
    )


def _solve_scipy_milp(c, A, row_lower, row_upper, col_lower, col_upper, integer, time_limit, mip_rel_gap):
    from scipy.optimize import Bounds, LinearConstraint, milp

    res = milp(
        c,
        constraints=LinearConstraint(A, row_lower, row_upper),
        integrality=np.asarray(integer, dtype=np.uint8),
        bounds=Bounds(col_lower, col_upper),
        options={"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap), "disp": False},
    )
    status = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded"}.get(res.status, f"error: {res.message}")
    x = None if res.x is None else np.asarray(res.x)
    obj = None if x is None else float(c @ x)
    bound = getattr(res, "mip_dual_bound", None)
    bound = None if bound is None or not np.isfinite(bound) else float(bound)
    return MILPResult(x, obj, bound, _gap(obj, bound) if status != "optimal" else 0.0, status, 0.0, "milp", False)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence writes to file descriptor 1 (C/C++ printf) for the duration of the block."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. some notebooks): nothing to do
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_highs(h, c, A, row_lower, row_upper, col_lower, col_upper, integer, time_limit, mip_rel_gap, warm_start):
    A = sparse.csc_matrix(A)
    n, m = c.size, A.shape[0]
    lp = h.HighsLp()
    lp.num_col_, lp.num_row_ = n, m
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, m
    lp.a_matrix_.format_ = h.MatrixFormat.kColwise
    lp.col_cost_ = c
    lp.col_lower_ = np.asarray(col_lower, dtype=float)
    lp.col_upper_ = np.asarray(col_upper, dtype=float)
    lp.row_lower_ = np.asarray(row_lower, dtype=float)
    lp.row_upper_ = np.asarray(row_upper, dtype=float)
    lp.a_matrix_.start_ = A.indptr
    lp.a_matrix_.index_ = A.indices
    lp.a_matrix_.value_ = A.data.astype(float)
    lp.integrality_ = [h.HighsVarType.kInteger if i else h.HighsVarType.kContinuous for i in integer]
    solver = h.Highs() if hasattr(h, "Highs") else h._Highs()
    solver.setOptionValue("output_flag", False)
    solver.setOptionValue("time_limit", float(time_limit))
    solver.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    solver.passModel(lp)
    warm = False
    if warm_start is not None:
        sol = h.HighsSolution()
        sol.col_value = warm_start
        sol.value_valid = True
        warm = solver.setSolution(sol) != h.HighsStatus.kError
    with _quiet_stdout():  # some HiGHS builds print debug lines from C++ when given a warm start
        solver.run()
    ms = solver.getModelStatus()
    status = {
        h.HighsModelStatus.kOptimal: "optimal",
        h.HighsModelStatus.kTimeLimit: "time_limit",
        h.HighsModelStatus.kInfeasible: "infeasible",
    }.get(ms, str(solver.modelStatusToString(ms)))
    info = solver.getInfo()
    x = None
    if int(info.primal_solution_status) == 2:  # kSolutionStatusFeasible
        x = np.asarray(solver.getSolution().col_value, dtype=float)
    obj = None if x is None else float(c @ x)
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    gap = 0.0 if status == "optimal" else _gap(obj, bound)
    return MILPResult(x, obj, bound, gap, status, 0.0, "", warm)


class ConstraintBuilder:
    """Accumulate sparse rows `lo <= sum(coef * x[col]) <= hi` (COO triplets) for solve_milp."""

    def __init__(self, num_cols: int) -> None:
        self.num_cols = num_cols
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, cols, vals, lo: float, hi: float) -> None:
        cols = np.asarray(cols, dtype=np.int64).ravel()
        vals = np.broadcast_to(np.asarray(vals, dtype=float), cols.shape)
        self.rows.append(np.full(cols.size, len(self.lo), dtype=np.int64))
        self.cols.append(cols)
        self.vals.append(vals)
        self.lo.append(lo)
        self.hi.append(hi)

    def add_many(self, cols: np.ndarray, vals: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows in bulk: cols/vals are [rows, terms]."""
        cols, vals = np.asarray(cols, dtype=np.int64), np.asarray(vals, dtype=float)
        vals = np.broadcast_to(vals, cols.shape)
        first = len(self.lo)
        self.rows.append(np.repeat(np.arange(first, first + cols.shape[0]), cols.shape[1]))
        self.cols.append(cols.ravel())
        self.vals.append(vals.ravel())
        self.lo.extend(np.broadcast_to(lo, (cols.shape[0],)).tolist())
        self.hi.extend(np.broadcast_to(hi, (cols.shape[0],)).tolist())

    def matrix(self) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(self.cols) if self.cols else np.zeros(0, dtype=np.int64)
        vals = np.concatenate(self.vals) if self.vals else np.zeros(0)
        A = sparse.csr_matrix((vals, (rows, cols)), shape=(len(self.lo), self.num_cols))
        return A, np.asarray(self.lo, dtype=float), np.asarray(self.hi, dtype=float)
