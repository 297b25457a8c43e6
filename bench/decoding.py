"""Evaluation decoding vs Hugging Face ``generate()`` on the same model and prompts.

    python -m bench.decoding                          # default model (random init), K = 0, 1, 3
    python -m bench.decoding --run runs/default       # and each lever's effect on that run's test mIoU
    python -m bench.decoding --compile                # also HF generate with a static cache, compiled
    python -m bench.decoding --quick                  # experiment=tiny, seconds

Decoders (greedy, KV cache; batch 1 = queries one at a time, batch 32 = one left-padded batch):

- ``constrained``: this project's constrained decoding (``generation.generate`` with the codec's
  slots): a forward pass per chosen digit or sign, the fixed text riding along with it;
- ``constrained_eager``: the same answers, one pass per chosen token and one per run of fixed
  text: the project before this benchmark -- the "fewer passes" lever;
- ``constrained_static``: ``constrained`` on a static KV cache (preallocated, written in place)
  instead of Hugging Face's DynamicCache (grown by concatenation) -- the "static KV cache" lever;
- ``adaptive``: constrained, but a query stops refining once a step's offsets are ``+00 and +00``:
  the rest of the layout is filled in without the model (that segment, zero offsets), and the
  query leaves the batch (its rows of the cache dropped) -- the "adaptive refinement depth" lever;
- ``free``: this project's free greedy decoding;
- ``hf_greedy``: ``model.lm.generate(inputs_embeds=...)``, greedy with its dynamic KV cache;
- ``hf_constrained``: the same with ``prefix_allowed_tokens_fn`` allowing the layout's token at each
  position (one token, or the digits/signs of a choice);
- ``hf_static_compiled`` (``--compile``): ``hf_greedy`` with ``cache_implementation="static"`` and
  its decoding step compiled (``CompileConfig``, allowed on CPU).

A random-init model never emits EOS on cue, so without ``--run`` free decoding runs exactly the
answer's length plus its EOS (what a trained model writes), and answers are checked identical where
they must be: constrained = constrained_eager = hf_constrained, free = hf_greedy (``match_*``
figures, share of queries). Timing: decoders take turns for ``--rounds`` rounds; queries/s from the
median round. Prints ``speedup_vs_hf_generate`` (constrained vs hf_constrained, K=3, batch 32;
target >= 2), queries/s and forward passes per query for every decoder, K and batch size, and
with ``--run`` the trained model's test mIoU and queries/s per decoder, and how often adaptive
decoding stopped early (``adaptive_tol1``: offsets within one frame of zero count as zero).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CompileConfig, StaticCache

from bench.figures_out import interleaved, machine, print_figures
from lightning_modules.generation import Generation, _constrained, _Decoder, generate
from lightning_modules.grounding_module import GroundingModule
from timerefine.answer_format.codec import Slot
from timerefine.answer_format.layout import spaced
from timerefine.answer_format.predictions import Prediction, predict, seconds
from timerefine.answer_format.timeline import MAX_INDEX
from timerefine.metrics.windows import record_iou
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

CHOICES_PER_ROUND = 10  # start, end (2 digits each); two signed offsets (sign + 2 digits each)
Decoder = Callable[[GroundingModule, dict], Generation]


# ---- decoders ------------------------------------------------------------------------------------


def _generate(
    module: GroundingModule, batch: dict, constrained: bool, eos_id: int, budget: int
) -> Generation:
    return generate(
        module.model,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["features"],
        eos_id=eos_id,
        max_new_tokens=budget,
        slots=module.codec.slots() if constrained else None,
        offset_id=module.offset_id if module.model.aux_head is not None else None,
    )


def static_cache_decoder(answer_length: int) -> type[_Decoder]:
    """The project's decoder on a static KV cache (preallocated for the prompt and the answer,
    written in place) instead of Hugging Face's DynamicCache (grown by concatenation every pass)."""

    class StaticCacheDecoder(_Decoder):
        def __init__(self, model, prompt_ids, *args) -> None:
            super().__init__(model, prompt_ids, *args)
            length = prompt_ids.shape[1] + answer_length
            self.past = StaticCache(config=model.lm.config, max_cache_len=length)

    return StaticCacheDecoder


class _EagerDecoder(_Decoder):
    """The project's decoding before this benchmark: every feed runs at once (one pass for the
    prompt, one per chosen token, one per fixed run)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._run()

    def feed(self, tokens: torch.Tensor, fed: torch.Tensor | None = None) -> None:
        super().feed(tokens, fed)
        self._run()


def constrained_with(decoder_type: type[_Decoder]) -> Decoder:
    """The project's constrained decoding (``generation._constrained``) on ``decoder_type``."""

    @torch.no_grad()
    def run(module: GroundingModule, batch: dict) -> Generation:
        decoder = _start(module, batch, decoder_type)
        tokens = _constrained(decoder, module.codec.slots(), in_step=False)
        decoder.finish()
        return Generation(tokens, decoder.offset_hidden, decoder.has_offset)

    return run


def _start(module: GroundingModule, batch: dict, decoder_type: type[_Decoder] = _Decoder) -> _Decoder:
    offset_id = module.offset_id if module.model.aux_head is not None else None
    return decoder_type(module.model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], offset_id)


def _single_tokens(slot: Slot) -> list[int]:
    """A choice slot's tokens (``model.answer_tokens=digits``: every digit and sign is one token)."""
    if any(len(choice) != 1 for choice in slot.choices):
        raise SystemExit("error: this benchmark's adaptive and HF decoders need model.answer_tokens=digits")
    return [token for (token,) in slot.choices]


def _slot_step(decoder: _Decoder, slot: Slot, rows: int) -> torch.Tensor:
    if slot.fixed:
        return torch.tensor(slot.fixed).expand(rows, -1)
    choices = torch.tensor(_single_tokens(slot))
    return choices[decoder.last_logits[:, choices].argmax(-1)].unsqueeze(1)


def _keep_rows(decoder: _Decoder, keep: torch.Tensor) -> None:
    """Drop the other rows from the decoder's cache, mask and waiting tokens."""
    for layer in decoder.past.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
    decoder.mask = decoder.mask[keep]
    decoder._pending = [tuple(part[keep] for part in item) for item in decoder._pending]
    decoder._logits = None if decoder._logits is None else decoder._logits[keep]
    decoder.has_offset = decoder.has_offset[keep]
    decoder.offset_hidden = None if decoder.offset_hidden is None else decoder.offset_hidden[keep]


def _value(chars: list[str]) -> int:
    """A number from its chosen characters: ``[tens, ones]`` or ``[sign, tens, ones]``."""
    sign = -1 if chars[0] == "-" else 1
    return sign * int("".join(c for c in chars if c.isdigit()))


@torch.no_grad()
def adaptive(module: GroundingModule, batch: dict, tolerance: int = 0) -> tuple[Generation, list[int]]:
    """Constrained decoding that stops refining a query once a round's two offsets are within
    ``tolerance`` frames of zero (0: ``+00 and +00``), and how many of the K + 1 rounds each query
    skipped. The rest is filled in without the model: that round's refined segment (coarse +
    offsets, clipped to the timeline) in every later round, with zero offsets."""
    slots, codec = module.codec.slots(), module.codec
    rows, steps = len(batch["records"]), codec.schedule.steps
    choice_slots = [i for i, slot in enumerate(slots) if slot.choices]
    if steps == 0:
        return _generate(module, batch, True, -1, 0), [0] * rows
    assert len(choice_slots) == CHOICES_PER_ROUND * (steps + 1), "unexpected answer layout"
    char_of = {token: char for char, token in codec.char_ids.items()}
    decoder = _start(module, batch)
    active = torch.arange(rows)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    chosen: list[list[str]] = [[] for _ in range(rows)]  # each row's chosen characters so far
    hidden_size = module.model.lm.config.hidden_size
    offset_hidden = torch.zeros(rows, hidden_size)
    has_offset = torch.zeros(rows, dtype=torch.bool)
    skipped = [0] * rows

    def keep_aux_state(positions: torch.Tensor, at: torch.Tensor) -> None:
        if decoder.offset_hidden is not None:
            offset_hidden[at] = decoder.offset_hidden[positions].float()
            has_offset[at] = decoder.has_offset[positions]

    for index, slot in enumerate(slots):
        step = _slot_step(decoder, slot, len(active))
        decoder.feed(step)
        for row, values in zip(active.tolist(), step.tolist(), strict=True):
            tokens[row] += values
            if slot.choices:
                chosen[row] += [char_of[v] for v in values]
        done = len(chosen[active[0]])
        if not slot.choices or done % CHOICES_PER_ROUND or done == CHOICES_PER_ROUND * (steps + 1):
            continue
        stop = torch.zeros(len(active), dtype=torch.bool)
        for position, row in enumerate(active.tolist()):
            last = chosen[row][-CHOICES_PER_ROUND:]  # start, end (2 digits each), 2 signed offsets
            start, end, shift_start, shift_end = (
                _value(last[0:2]),
                _value(last[2:4]),
                _value(last[4:7]),
                _value(last[7:10]),
            )
            if max(abs(shift_start), abs(shift_end)) > tolerance:
                continue
            stop[position] = True
            refined = [min(max(x, 0), MAX_INDEX) for x in (start + shift_start, end + shift_end)]
            fill = [*f"{refined[0]:02d}{refined[1]:02d}", "+", "0", "0", "+", "0", "0"]
            filler = {i: codec.char_ids[fill[n % CHOICES_PER_ROUND]] for n, i in enumerate(choice_slots)}
            tokens[row] += [t for i in range(index + 1, len(slots)) for t in (slots[i].fixed or (filler[i],))]
            skipped[row] = steps + 1 - done // CHOICES_PER_ROUND
        if not stop.any():
            continue
        keep_aux_state(stop.nonzero().flatten(), active[stop])
        keep = (~stop).nonzero().flatten()
        active = active[keep]
        if not len(active):
            break
        _keep_rows(decoder, keep)
    decoder.finish()
    if len(active):
        keep_aux_state(torch.arange(len(active)), active)
    hidden = offset_hidden if module.offset_id is not None and module.model.aux_head is not None else None
    return Generation(tokens, hidden, has_offset), skipped


def _layout_tokens(slots: list[Slot]) -> list[list[int]]:
    """The tokens allowed at each position of the answer."""
    allowed: list[list[int]] = []
    for slot in slots:
        allowed += [[t] for t in slot.fixed] or [_single_tokens(slot)]
    return allowed


@torch.no_grad()
def hf_generate(module: GroundingModule, batch: dict, *, constrained: bool, budget: int, eos_id: int | None,
                **options) -> Generation:  # fmt: skip
    """``generate()`` of the Hugging Face LM on the spliced prompt embeddings."""
    model = module.model
    embeds = model.embed(batch["prompt_ids"], batch["features"], batch["prompt_mask"])
    kwargs = {}
    if constrained:
        allowed = _layout_tokens(module.codec.slots())
        budget = len(allowed)
        kwargs["prefix_allowed_tokens_fn"] = lambda _, sent: allowed[min(sent.shape[-1], budget - 1)]
    out = model.lm.generate(
        inputs_embeds=embeds,
        attention_mask=batch["prompt_mask"],
        max_new_tokens=budget,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_id,
        pad_token_id=module.tokenizer.pad_token_id,
        **kwargs,
        **options,
    )
    rows = out.tolist()
    if eos_id is not None:
        rows = [row[: row.index(eos_id)] if eos_id in row else row for row in rows]
    return Generation(rows, None, torch.zeros(len(rows), dtype=torch.bool))


def decoders(module: GroundingModule, trained: bool, compile_step: bool) -> dict[str, Decoder]:
    """The decoders to compare. A random-init model gets no EOS: free decoding runs the answer's
    length plus one token, as a trained model's answer and its EOS."""
    eos = module.codec.end_id
    budget = module.codec.answer_length() + (8 if trained else 1)
    free_eos, hf_eos = (eos, eos) if trained else (-1, None)
    runs: dict[str, Decoder] = {
        "constrained": lambda m, b: _generate(m, b, True, eos, budget),
        "constrained_static": constrained_with(static_cache_decoder(module.codec.answer_length())),
        "constrained_eager": constrained_with(_EagerDecoder),
        "adaptive": lambda m, b: adaptive(m, b)[0],
        "adaptive_tol1": lambda m, b: adaptive(m, b, tolerance=1)[0],
        "free": lambda m, b: _generate(m, b, False, free_eos, budget),
        "hf_greedy": lambda m, b: hf_generate(m, b, constrained=False, budget=budget, eos_id=hf_eos),
        "hf_constrained": lambda m, b: hf_generate(m, b, constrained=True, budget=budget, eos_id=hf_eos),
    }
    if compile_step:
        config = CompileConfig(dynamic=False, mode="default")
        config._compile_all_devices = True  # CompileConfig's flag for compiling off GPU
        runs["hf_static_compiled"] = lambda m, b: hf_generate(
            m, b, constrained=False, budget=budget, eos_id=hf_eos,
            cache_implementation="static", compile_config=config,
        )  # fmt: skip
    return runs


# ---- measuring -----------------------------------------------------------------------------------


class PassCounter:
    """Counts the LM's forward passes (a forward pre-hook)."""

    def __init__(self, module: GroundingModule) -> None:
        self.count = 0
        module.model.lm.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1


def predictions(module: GroundingModule, generation: Generation) -> list[Prediction]:
    """Parsed predictions, as ``GroundingModule.predict_batch`` makes them."""
    aux = module._aux_segments(generation)
    texts = [spaced(t) for t in module.tokenizer.batch_decode(generation.tokens, skip_special_tokens=False)]
    num_segments, final = module.codec.schedule.num_segments, module.inference.final
    return [
        predict(text, num_segments, final, a, module.timeline) for text, a in zip(texts, aux, strict=True)
    ]


def speed(module: GroundingModule, batches: list[dict], runs: dict[str, Decoder], rounds: int) -> dict:
    """Queries/s and forward passes per query of each decoder, and which answers agree."""
    counter, answers, passes = PassCounter(module), {}, {}
    for name, run in runs.items():  # warm-up, answers and passes
        counter.count = 0
        answers[name] = [row for b in batches for row in run(module, b).tokens]
        passes[name] = counter.count / len(batches)
    seconds = interleaved({n: (lambda r=r: [r(module, b) for b in batches]) for n, r in runs.items()}, rounds)
    queries = sum(len(b["records"]) for b in batches)
    out = {n: {"qps": queries / statistics.median(s), "passes": passes[n]} for n, s in seconds.items()}
    for a, b in (
        ("constrained", "constrained_eager"),
        ("constrained", "hf_constrained"),
        ("free", "hf_greedy"),
    ):
        same = sum(x == y for x, y in zip(answers[a], answers[b], strict=True))
        out[f"match_{a}_{b}"] = same / len(answers[a])
    return out


TOLERANCES = {"adaptive": 0, "adaptive_tol1": 1}


def quality(module: GroundingModule, loader, runs: dict[str, Decoder]) -> dict[str, float]:
    """Per decoder on the trained model's test split: mIoU, queries/s (decoders take turns on each
    batch) and, for adaptive decoding, the share of queries that stopped early and the rounds skipped."""
    ious: dict[str, list[float]] = {name: [] for name in runs}
    seconds_taken = dict.fromkeys(runs, 0.0)
    skipped: dict[str, list[int]] = {name: [] for name in runs if name in TOLERANCES}
    for batch in loader:
        for name, run in runs.items():
            start = time.perf_counter()
            if name in TOLERANCES:
                generation, skips = adaptive(module, batch, TOLERANCES[name])
                skipped[name] += skips
            else:
                generation = run(module, batch)
            seconds_taken[name] += time.perf_counter() - start
            for record, prediction in zip(batch["records"], predictions(module, generation), strict=True):
                final = seconds(prediction.final, record.duration, module.timeline)
                ious[name].append(record_iou(final, record))
    out: dict[str, float] = {}
    print(
        "| decoder (trained model, test split) | test mIoU | queries/s | queries stopped early | rounds skipped per query |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, values in ious.items():
        out[f"test_mIoU_{name}"] = 100 * statistics.mean(values)
        out[f"test_qps_{name}"] = len(values) / seconds_taken[name]
        stopped = rounds = math.nan
        if name in skipped:
            stopped = sum(s > 0 for s in skipped[name]) / len(skipped[name])
            rounds = statistics.mean(skipped[name])
            out[f"{name}_stopped_early"], out[f"{name}_rounds_skipped"] = stopped, rounds
        print(
            f"| {name} | {out[f'test_mIoU_{name}']:.2f} | {out[f'test_qps_{name}']:.1f} | {stopped:.3f} | {rounds:.2f} |"
        )
    return out


def load_run(run_dir: Path) -> tuple[GroundingModule, object]:
    """A run's best checkpoint in eval mode, and its datamodule."""
    from timerefine.pipeline.best_checkpoint import recorded_best

    cfg = load_config([], name="config", config_dir=run_dir)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule, tokenizer_dir=run_dir / "tokenizer")
    state = torch.load(recorded_best(run_dir / "checkpoints"), map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    return module.eval(), datamodule


def random_model(k: int, extra: list[str]) -> tuple[GroundingModule, object]:
    cfg = load_config([f"model.refine.steps={k}", f"model.aux.weight={1.0 if k else 0.0}", *extra])
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_module(cfg, datamodule).eval(), datamodule


def test_batches(datamodule, size: int, count: int) -> list[dict]:
    items = [datamodule.datasets["test"][(0, i)] for i in range(size * count)]
    return [datamodule.collator(items[i * size : (i + 1) * size]) for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a trained run: decode its test split with each lever")
    parser.add_argument("--refine-steps", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--singles", type=int, default=8, help="queries decoded one at a time")
    parser.add_argument("--compile", action="store_true", help="also HF generate, static cache, compiled")
    parser.add_argument("--quick", action="store_true", help="experiment=tiny, one round")
    args = parser.parse_args(argv)
    extra = ["experiment=tiny"] if args.quick else []
    rounds, singles, batch_size = (1, 2, 4) if args.quick else (args.rounds, args.singles, 32)
    print(f"machine: {machine()}")
    print("| K | batch | decoder | queries/s | forward passes per query |")
    print("|---|---|---|---:|---:|")
    figures: dict[str, float] = {}
    for k in args.refine_steps:
        module, datamodule = random_model(k, extra)
        runs = decoders(module, trained=False, compile_step=args.compile)
        for size, batches in ((1, test_batches(datamodule, 1, singles)),
                              (batch_size, test_batches(datamodule, batch_size, 1))):  # fmt: skip
            result = speed(module, batches, runs, rounds)
            for name in runs:
                qps, passes = result[name]["qps"], result[name]["passes"]
                print(f"| {k} | {size} | {name} | {qps:.1f} | {passes:.0f} |", flush=True)
                figures[f"qps_K{k}_b{size}_{name}"] = qps
                figures[f"passes_K{k}_b{size}_{name}"] = passes
            figures |= {f"{n}_K{k}_b{size}": v for n, v in result.items() if n.startswith("match_")}
    top = f"K{max(args.refine_steps)}_b{batch_size}"
    figures = {
        "speedup_vs_hf_generate": figures[f"qps_{top}_constrained"] / figures[f"qps_{top}_hf_constrained"],
        "speedup_vs_hf_greedy": figures[f"qps_{top}_constrained"] / figures[f"qps_{top}_hf_greedy"],
        "speedup_vs_eager": figures[f"qps_{top}_constrained"] / figures[f"qps_{top}_constrained_eager"],
        **figures,
    }
    if args.run:
        module, datamodule = load_run(args.run)
        runs = decoders(module, trained=True, compile_step=False)
        runs = {n: runs[n] for n in ("constrained", "constrained_eager", "adaptive", "adaptive_tol1", "free")}
        figures |= quality(module, datamodule.test_dataloader(), runs)
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
