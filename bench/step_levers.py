"""What a training step of the default model costs under each lever, as a ratio to the plain step.

    python -m bench.step_levers                # threads, bf16 autocast, 2 frames per token, eager attention
    python -m bench.step_levers --compile      # also torch.compile of the LM (its compile time printed)
    python -m bench.step_levers --quick        # experiment=tiny, one round
    python -m bench.step_levers --experiment smollm2 --batch 8   # a pretrained LM (SmolLM2-135M + LoRA)
    python -m bench.step_levers --experiment smollm2 --only logits_everywhere,bf16_autocast
    python -m bench.step_levers --only bf16_autocast model.lm.tiny.hidden_size=512   # overrides last

Every variant gets its own copy of the default model and the same training batches (batch 32) and
runs ``--steps`` steps (forward, backward, AdamW) per round; variants take turns for ``--rounds``
rounds and each is reported as the median of its per-round ratio to ``base`` (the default: torch's
intra-op threads, fp32, 4 frames per token, SDPA attention). ``threads1``/``threads2``: the same
step with 1 / 2 intra-op threads (``torch.set_num_threads``). ``logits_everywhere``: the LM head and
cross-entropy on every position, as Hugging Face's own loss does, instead of only on the positions
that predict an answer token (the module's). ``gradient_checkpointing``: activations recomputed in
the backward pass. ``bf16_weights``: the LM's weights stored in bf16 (``model.lm.dtype=bfloat16``)
under bf16 autocast; the projector, heads and LoRA adapters stay fp32 (left out without LoRA, where the
whole LM trains and the config refuses bf16 weights). With ``--experiment`` every
variant starts from that experiment (its LM, its frames per token; ``frames_per_token2`` is then
left out). Prints ``ratio_<variant>=`` (< 1 is faster) and ``base_s_per_step``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from types import MethodType

import torch

from bench.arguments import names_of
from bench.figures_out import machine, median_ratio, print_figures
from grounding.answer_format.tokens import IGNORE_INDEX
from lightning_modules.video_llm import VideoLLM
from timerefine.pipeline.arguments import at_least_one
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

# name: (overrides, autocast dtype, intra-op threads, attention implementation)
VARIANTS = {
    "base": ([], None, None, None),
    "threads1": ([], None, 1, None),
    "threads2": ([], None, 2, None),
    "bf16_autocast": ([], torch.bfloat16, None, None),
    "frames_per_token2": (["model.projector.frames_per_token=2"], None, None, None),
    "eager_attention": ([], None, None, "eager"),
    "logits_everywhere": ([], None, None, None),
    "gradient_checkpointing": (["model.lm.gradient_checkpointing=true"], None, None, None),
    "bf16_weights": (["model.lm.dtype=bfloat16"], torch.bfloat16, None, None),
}


def logits_everywhere(self: VideoLLM, input_ids, attention_mask, features, labels=None):
    """VideoLLM.forward as Hugging Face computes the loss: logits at every position."""
    prompt = attention_mask.bool() & (labels == IGNORE_INDEX)
    embeds, frames = self._embed_with_frames(input_ids, features, prompt)
    out = self.lm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        labels=labels,
        output_hidden_states=self.aux_head is not None,
        use_cache=False,
    )
    if self.saliency_head is not None:
        out["saliency_logits"] = self.saliency_head(frames.float()).squeeze(-1)
    return out


def setup(name: str, overrides: list[str], batches: int, attention: str | None) -> dict:
    cfg = load_config(overrides)
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    if attention:
        module.model.lm.config._attn_implementation = attention
    if name == "logits_everywhere":
        module.model.forward = MethodType(logits_everywhere, module.model)
    loader = iter(datamodule.train_dataloader())
    return {
        "module": module,
        "optimizer": torch.optim.AdamW(module.parameters(), lr=1e-4),
        "batches": [next(loader) for _ in range(batches)],
    }


def steps(run: dict, dtype: torch.dtype | None) -> None:
    for batch in run["batches"]:
        with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
            loss = run["module"]._losses(batch)["loss"]
        loss.backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument("--steps", type=at_least_one, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile(model.lm, dynamic=True)")
    parser.add_argument("--quick", action="store_true", help="experiment=tiny, one round of one step")
    parser.add_argument("--experiment", help="start every variant from this experiment (e.g. smollm2)")
    parser.add_argument("--batch", type=at_least_one, help="data.batch_size (default: the experiment's)")
    parser.add_argument(
        "--only", type=names_of(VARIANTS), help="comma-separated variants to run besides base (default: all)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides of every variant")
    args = parser.parse_args(argv)
    if args.experiment and "frames_per_token2" in (args.only or []):
        parser.error("--only: frames_per_token2 is left out with --experiment (it sets frames per token)")
    extra = (
        ["experiment=tiny"] if args.quick else [f"experiment={args.experiment}"] if args.experiment else []
    )
    extra += [f"data.batch_size={args.batch}"] if args.batch else []
    extra += args.overrides
    rounds, count = (1, 1) if args.quick else (args.rounds, args.steps)
    default_threads = torch.get_num_threads()
    print(f"machine: {machine()}")
    variants = dict(VARIANTS)
    if args.experiment:
        del variants["frames_per_token2"]
    if not load_config(extra).model.lora.enabled:  # the LM trains whole: bf16 weights are refused
        if "bf16_weights" in (args.only or []):
            parser.error("--only: bf16_weights needs model.lora.enabled=true (e.g. --experiment smollm2)")
        del variants["bf16_weights"]
    if args.only:
        variants = {n: v for n, v in variants.items() if n == "base" or n in args.only}
    if args.compile:
        variants["compiled"] = ([], None, None, None)
    runs = {name: setup(name, [*extra, *v[0]], count, v[3]) for name, v in variants.items()}
    figures: dict[str, float] = {}
    if args.compile:
        runs["compiled"]["module"].model.lm = torch.compile(runs["compiled"]["module"].model.lm, dynamic=True)
        start = time.perf_counter()
        steps(runs["compiled"], None)
        figures["compile_s"] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, (_, dtype, threads, _) in variants.items():
            torch.set_num_threads(threads or default_threads)
            start = time.perf_counter()
            steps(runs[name], dtype)
            seconds[name].append((time.perf_counter() - start) / count)
    torch.set_num_threads(default_threads)
    seconds = {name: values[1:] for name, values in seconds.items()}
    print("| variant | step time / base's | s per step here (median) |")
    print("|---|---:|---:|")
    for name, values in seconds.items():
        ratio = median_ratio(values, seconds["base"])
        figures[f"ratio_{name}"] = ratio
        print(f"| {name} | {ratio:.2f} | {statistics.median(values):.3f} |")
    figures["base_s_per_step"] = statistics.median(seconds["base"])
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
