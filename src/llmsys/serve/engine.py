"""The serving engine: continuous batching of many requests on paged KV, with a pluggable scheduler.

    from llmsys.serve import Engine, SamplingParams

    engine = Engine(model, scheduler="nexus")              # or "chunked", "fcfs", "static", an instance
    rid = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64))
    for event in engine.stream(rid):                       # drives the engine until rid finishes
        print(event.token)
    outputs = engine.generate([ids_a, ids_b, ids_c])       # many requests at once

`AsyncEngine(engine)` is the asyncio front end (`async for event in aengine.stream(prompt)`).

Where the lanes run: on CUDA each lane's batch is enqueued on its own stream (a green-context SM
partition for a disaggregated scheduler's split when torch offers them, else plain streams, said in
`engine.execution`) and the loop waits for whichever lane finishes first, so the decode lane keeps
iterating while a long prefill runs. On a CPU the lanes run one after another (the split is
logical). The engine is not thread-safe: use it from one thread, or through `AsyncEngine`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llmsys.serve.core import Completion, ServingCore, run_serial_round
from llmsys.serve.costmodel import BatchWork, CostModel, ModelShape, Profile, default_profile, vllm_max_num_seqs
from llmsys.serve.errors import EngineClosedError, PromptTooLongError, RequestNotFoundError
from llmsys.serve.metrics import RequestRecord
from llmsys.serve.partition import ExecutionInfo, LaneStreams
from llmsys.serve.request import Batch, RequestState, SamplingParams
from llmsys.serve.runner import ModelRunner, StepOutput
from llmsys.serve.schedulers import Nexus, Scheduler, make_scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request."""

    request_id: str
    token: int
    index: int  # 0 for the first generated token
    time: float  # seconds since the engine started
    finished: bool
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """A request's generated tokens and timeline (final once `finished`)."""

    request_id: str
    prompt: list[int]
    tokens: list[int]
    finished: bool
    finish_reason: str | None
    record: RequestRecord

    @property
    def ttft(self) -> float | None:
        return self.record.ttft

    @property
    def tbts(self) -> list[float]:
        return self.record.tbts


@dataclass
class _Live:
    state: RequestState
    prompt: list[int]
    params: SamplingParams
    stop: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


def _eos_ids(model: nn.Module) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class Engine:
    """Continuous batching over a dense transformers model, KV in shared per-layer page pools.

    Args:
        model: a supported dense causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3), in eval mode.
        scheduler: "fcfs", "chunked", "static", "nexus" or a `Scheduler` instance.
        page_size: tokens per KV page.
        num_pages: pages per layer in the pool (None: 1024 on a CPU; on CUDA, half the free memory).
        max_num_seqs: most requests admitted (holding pages) at once (None: on CUDA vLLM's default for
            the device, 1024 on an H100-class GPU and 256 on smaller ones; 64 on a CPU).
        profile: cost-model profile for a Nexus scheduler made by name (default: `default_profile()`
            applied to this model's shape).
        kernel_backend: backend of `paged_decode_attention` (default "auto" on CUDA, "reference" on CPU).
        use_green_contexts: bind a split's lanes to SM partitions when torch can (CUDA only).
        record_batches: keep `(lane, BatchWork, seconds)` of every batch in `batch_log` (what the CPU
            profile is fitted to: scheduling, forward, sampling and bookkeeping of the batch).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler: str | Scheduler = "chunked",
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        max_num_seqs: int | None = None,
        profile: Profile | None = None,
        kernel_backend: str | None = None,
        use_green_contexts: bool = True,
        record_batches: bool = False,
    ):
        device = next(model.parameters()).device
        if num_pages is None:
            num_pages = _default_num_pages(model, page_size, device)
        if max_num_seqs is None:
            max_num_seqs = _default_max_num_seqs(device)
        self.model = model
        self.runner = ModelRunner(model, page_size=page_size, num_pages=num_pages, kernel_backend=kernel_backend)
        if isinstance(scheduler, str) and scheduler == "nexus":
            prof = profile if profile is not None else default_profile().with_model(ModelShape.from_model(model))
            scheduler = Nexus(cost_model=CostModel(prof))
        self.scheduler: Scheduler = make_scheduler(scheduler)
        self._streams: LaneStreams | None = None
        if device.type == "cuda":
            self._streams = LaneStreams.create(device, use_green_contexts and self.scheduler.disaggregated)
            self.execution: ExecutionInfo = self._streams.info
        else:
            self.execution = ExecutionInfo("serial-cpu", "cpu", reason="no CUDA device")
        self.core = ServingCore(
            self.scheduler,
            page_size=page_size,
            num_pages=num_pages,
            max_num_seqs=max_num_seqs,
            concurrent=self._streams is not None,
        )
        self._eos = _eos_ids(model)
        self._live: dict[str, _Live] = {}
        self._done: dict[str, RequestOutput] = {}
        self._pending: dict[str, tuple[Batch, StepOutput]] = {}
        self._launched: dict[str, tuple[BatchWork, float]] = {}
        self._ids = itertools.count()
        self._t0 = time.perf_counter()
        self._closed = False
        self.batch_log: list[tuple[str, BatchWork, float]] | None = [] if record_batches else None
        logger.info("llmsys.serve engine: %s scheduler, %s", self.scheduler.name, self.execution.describe())

    # ------------------------------------------------------------------------------------------
    # requests
    def now(self) -> float:
        """Seconds since the engine started (the clock of every timestamp it reports)."""
        return time.perf_counter() - self._t0

    def prepare(
        self, prompt: Sequence[int] | torch.Tensor, params: SamplingParams | None = None, request_id: str | None = None
    ) -> _Live:
        """Validate a request without queueing it (raises on bad input; changes no engine state)."""
        self._check_open()
        params = params or SamplingParams()
        ids = prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: a request needs at least one token")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}), got min {min(ids)} and max {max(ids)}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._live or rid in self._done:
            raise ValueError(f"request id {rid!r} is already in use")
        limit = self.runner.max_positions
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise PromptTooLongError(
                f"request {rid}: {len(ids)} prompt tokens + max_new_tokens={params.max_new_tokens} exceed the model's "
                f"max_position_embeddings={limit}; shorten the prompt or lower max_new_tokens"
            )
        state = RequestState(rid, prompt_len=len(ids), max_new_tokens=params.max_new_tokens, arrival=self.now())
        self.core.check_fits(state)
        stop = frozenset() if params.ignore_eos else (
            frozenset(params.stop_token_ids) if params.stop_token_ids is not None else self._eos
        )  # fmt: skip
        gen = None
        if not params.greedy:
            gen = torch.Generator()
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()  # a fresh non-deterministic seed, without touching torch's global RNG
        return _Live(state, ids, params, stop, generator=gen)

    def enqueue(self, live: _Live) -> str:
        """Queue a request made by `prepare` (its arrival time is when it was prepared)."""
        self._check_open()
        rid = live.state.request_id
        if rid in self._live or rid in self._done:
            raise ValueError(f"request id {rid!r} is already in use")
        self.core.add(live.state)
        self._live[live.state.request_id] = live
        return live.state.request_id

    def submit(
        self, prompt: Sequence[int] | torch.Tensor, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. A request that can never fit raises `PromptTooLongError`
        here, and nothing else changes."""
        return self.enqueue(self.prepare(prompt, params, request_id))

    def cancel(self, request_id: str) -> bool:
        """Cancel a request; its pages are freed (at once, or when its running batch ends on CUDA).

        Returns False if it had already finished; raises `RequestNotFoundError` for an unknown id.
        """
        live = self._live.get(request_id)
        if live is None:
            if request_id in self._done:
                return False
            raise RequestNotFoundError(f"no request {request_id!r}")
        if self.core.cancel(live.state, self.now()):
            self._retire(live)
        return True

    def output(self, request_id: str) -> RequestOutput:
        """The request's tokens so far (final once it has finished)."""
        live = self._live.get(request_id)
        if live is not None:
            return self._output(live)
        try:
            return self._done[request_id]
        except KeyError:
            raise RequestNotFoundError(f"no request {request_id!r}") from None

    def is_finished(self, request_id: str) -> bool:
        """True once the request has finished (False while it runs or if the engine has not seen it)."""
        return request_id in self._done

    def forget(self, request_id: str) -> None:
        """Drop a finished request's output (a long-running server calls this after delivering it)."""
        self._done.pop(request_id, None)

    def has_work(self) -> bool:
        return self.core.has_work()

    @property
    def num_live(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------------------------------
    # running
    def step(self) -> list[TokenEvent]:
        """Run one scheduling round; returns the tokens it produced."""
        self._check_open()
        events: list[TokenEvent] = []
        if self._streams is None:
            outputs: dict[int, tuple[dict[str, int], BatchWork]] = {}
            mark = [time.perf_counter()]  # a batch's time runs from the previous batch's end to its own

            def execute(batch: Batch) -> set[str]:
                work = BatchWork.of(batch) if self.batch_log is not None else None  # before the states move on
                tokens = self._sample(self.runner.run(batch, self._inputs(batch)))
                outputs[id(batch)] = (tokens, work)
                return self._stopped(tokens)

            def on_complete(batch: Batch, done: list[Completion]) -> None:
                tokens, work = outputs.pop(id(batch))
                self._apply(done, tokens, events)
                end = time.perf_counter()
                if self.batch_log is not None:
                    self.batch_log.append((batch.lane, work, end - mark[0]))
                mark[0] = end

            run_serial_round(self.core, self.now, execute, on_complete)
        else:
            self._step_concurrent(events)
        return events

    def _step_concurrent(self, events: list[TokenEvent]) -> None:
        # launch every idle lane, then wait for the first to finish: the other keeps running
        for lane in self.core.lanes:
            if lane in self._pending:
                continue
            batch = self.core.schedule(lane, self.now())
            if batch is None:
                continue
            stream = self._streams.stream(lane, batch.sm_share)
            if self.batch_log is not None:
                self._launched[lane] = (BatchWork.of(batch), time.perf_counter())
            self._pending[lane] = (batch, self.runner.run(batch, self._inputs(batch), stream))
        if not self._pending:
            return
        while True:
            done = [lane for lane, (_, out) in self._pending.items() if out.done()]
            if done:
                break
            time.sleep(2e-5)
        for lane in done:
            batch, out = self._pending.pop(lane)
            tokens = self._sample(out)
            completions = self.core.complete(batch, self.now(), self._stopped(tokens))
            self._apply(completions, tokens, events)
            if self.batch_log is not None:
                work, start = self._launched.pop(lane)
                self.batch_log.append((lane, work, time.perf_counter() - start))

    def run(self, max_steps: int | None = None) -> None:
        """Step until no request is left (or `max_steps` rounds)."""
        steps = 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1

    def stream(self, request_id: str) -> Iterator[TokenEvent]:
        """Yield a request's tokens as they come, stepping the engine (all requests advance)."""
        index = 0
        while True:
            out = self.output(request_id)
            times = out.record.token_times
            while index < len(out.tokens):
                last = out.finished and index == len(out.tokens) - 1
                yield TokenEvent(
                    request_id, out.tokens[index], index, times[index], last, out.finish_reason if last else None
                )
                index += 1
            if out.finished:
                return
            self.step()

    def generate(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Submit every prompt at once, run to completion, return the outputs in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        self.run()
        return [self.output(i) for i in ids]

    # ------------------------------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> dict[str, list[int]]:
        inputs = {}
        for req, n in batch.prefill:
            inputs[req.request_id] = self._live[req.request_id].prompt[req.prefilled : req.prefilled + n]
        for req in batch.decode:
            inputs[req.request_id] = [self._live[req.request_id].tokens[-1]]
        return inputs

    def _sample(self, out: StepOutput) -> dict[str, int]:
        if not out.rows:
            return {}
        greedy = out.greedy.tolist()  # waits for this lane's forward only
        tokens = {}
        for rid, row in out.rows.items():
            live = self._live[rid]
            tokens[rid] = greedy[row] if live.params.greedy else _sample_row(out.logits[row], live)
        return tokens

    def _stopped(self, tokens: dict[str, int]) -> set[str]:
        return {rid for rid, tok in tokens.items() if tok in self._live[rid].stop}

    def _apply(self, completions: list[Completion], tokens: dict[str, int], events: list[TokenEvent]) -> None:
        for c in completions:
            live = self._live[c.request.request_id]
            if c.new_token:
                live.tokens.append(tokens[c.request.request_id])
                events.append(
                    TokenEvent(
                        c.request.request_id,
                        live.tokens[-1],
                        len(live.tokens) - 1,
                        c.request.token_times[-1],
                        c.finished,
                        c.request.finish_reason if c.finished else None,
                    )
                )
            if c.finished:
                self._retire(live)

    def _retire(self, live: _Live) -> None:
        rid = live.state.request_id
        self.runner.free(rid)
        del self._live[rid]
        self._done[rid] = self._output(live)

    def _output(self, live: _Live) -> RequestOutput:
        s = live.state
        return RequestOutput(s.request_id, live.prompt, list(live.tokens), s.finished, s.finish_reason,
                             RequestRecord.of(s))  # fmt: skip

    # ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the engine's invariants: pools, lockstep, no page leaked or held past a reservation."""
        self.runner.check()
        held = set(self.runner.pages)
        if not held <= set(self._live):
            raise AssertionError(f"pages held by finished requests: {sorted(held - set(self._live))}")
        reserved = sum(live.state.reserved_pages for live in self._live.values())
        if reserved != self.core.reserved_pages:
            raise AssertionError(f"reservations {reserved} != core's {self.core.reserved_pages}")
        for rid, pages in self.runner.pages.items():
            if len(pages) > self._live[rid].state.reserved_pages:
                raise AssertionError(f"{rid} holds {len(pages)} pages, more than its reservation")

    def close(self) -> None:
        """Cancel everything and free every page; the engine refuses work afterwards."""
        if self._closed:
            return
        if self._pending:
            torch.cuda.synchronize(self.runner.device)
            for batch, _ in list(self._pending.values()):
                self.core.complete(batch, self.now(), ())
            self._pending.clear()
        for live in list(self._live.values()):
            self.core.cancel(live.state, self.now())
            self._retire(live)
        self._closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine was closed; create a new Engine")


def _sample_row(logits: torch.Tensor, live: _Live) -> int:
    p = live.params
    logits = logits.float().cpu() / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=live.generator))


def _default_num_pages(model: nn.Module, page_size: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1024
    from llmsys.models import decoder_layers, kv_heads

    _, hkv, hd = kv_heads(model)
    itemsize = next(model.parameters()).element_size()
    page_bytes = 2 * hkv * page_size * hd * itemsize * len(decoder_layers(model))
    free, _ = torch.cuda.mem_get_info(device)
    return max(16, int(0.5 * free // page_bytes))


def _default_max_num_seqs(device: torch.device) -> int:
    if device.type != "cuda":
        return 64  # a CPU engine serves tiny models; its batches stay small
    props = torch.cuda.get_device_properties(device)
    return vllm_max_num_seqs(props.total_memory, props.name)


__all__ = ["Engine", "RequestOutput", "TokenEvent"]
