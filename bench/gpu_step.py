"""Training throughput of a 7B-shaped Video LLM on one device: plain and FSDP, bf16, LoRA r 64.

    python -m bench.gpu_step                          # 7B shape on the GPU
    python -m bench.gpu_step --shape tiny             # a small shape on the CPU (CI keeps it working)
    python -m bench.gpu_step --quick                  # = --shape tiny --steps 1

The model is built the project's way, from config with random weights (nothing is downloaded): a
LLaMA-shaped LM (``--shape 7b``: hidden 4096, 32 layers, 32 heads, MLP 11008, 32,000-row vocabulary,
as Llama-2-7B / Vicuna-7B under VTimeLLM) with SDPA attention and gradient checkpointing, every
parameter in bf16 (adapters too),
LoRA r 64 (alpha 128) on every linear layer with the grounding tokens' rows trainable, the MLP
projector from 768-d CLIP frame features, the aux head and the saliency head. A sample is 100 video
tokens (100 frames, one per token) + the prompt + a K = 3 TimeRefine answer. One step = LM
cross-entropy + aux + saliency losses, backward, AdamW on the trainable parameters, under bf16
autocast.

Batch sizes double from 1 until one does not fit (GPU only; ``--max-batch`` caps the search); the
largest that fits is timed for ``--steps`` steps after 2 warm-up steps, plain and wrapped
in torch FSDP with one unit per decoder layer (``use_orig_params``, as ``trainer=fsdp`` builds it),
world size 1 (NCCL; gloo on the CPU). Model FLOPs per token = 4 N + 12 L T d + 6 N_lora (N: the LM's matmul weights,
frozen: forward and input gradients only; attention at sequence length T; LoRA trained; the
recomputation of checkpointing not counted), MFU = tokens/s x that / the device's dense bf16 peak
(``--peak-tflops``, else known from the device name). Prints ``{plain,fsdp}_{tokens_per_s,
samples_per_s,peak_mem_gb,mfu}`` and ``largest_batch``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from bench.figures_out import machine, print_figures
from datamodules.builtin import BuiltinFeatureStore, BuiltinSpec, builtin_records
from datamodules.collate import GroundingCollator
from datamodules.dataset import GroundingDataset
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.corpus import tokenizer_corpus
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, render_prompt
from grounding.answer_format.targets import RefineSchedule
from lightning_modules.aux_head import AuxSpec
from lightning_modules.decoding import InferenceSpec
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import (
    LMSpec,
    LoraSpec,
    TinyLMSpec,
    apply_lora,
    build_language_model,
    grounding_token_ids,
)
from lightning_modules.optimization import OptimSpec
from lightning_modules.projector import ProjectorSpec
from lightning_modules.tokenizer import build_tokenizer
from lightning_modules.video_llm import VideoLLM
from timerefine.pipeline.arguments import at_least_one
from timerefine.pipeline.strategy import decoder_layer_classes


@dataclass(frozen=True)
class Shape:
    lm: TinyLMSpec
    vocab: int
    feature_dim: int


SHAPES = {
    "7b": Shape(
        TinyLMSpec(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008), 32000, 768
    ),
    "tiny": Shape(TinyLMSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=172), 32000, 32),
}
# Dense bf16 tensor-core peak (TFLOP/s) by device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
NUM_FRAMES, REFINE_STEPS, LORA = 100, 3, LoraSpec(r=64, alpha=128, dropout=0.05)


def peak_tflops(device: torch.device, given: float | None) -> float:
    if given or device.type != "cuda":
        return given or math.nan
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), math.nan)


def data(shape: Shape, count: int) -> tuple[GroundingDataset, AnswerCodec]:
    spec = BuiltinSpec(num_train=count, num_frames=NUM_FRAMES, feature_dim=shape.feature_dim)
    records = builtin_records(spec, "train")
    schedule = RefineSchedule(steps=REFINE_STEPS)
    prompts = [render_prompt(DEFAULT_TEMPLATE, r.query) for r in records]
    tokenizer = build_tokenizer(
        None, tokenizer_corpus(prompts, [r.duration for r in records], schedule), 1000
    )
    return GroundingDataset(records, BuiltinFeatureStore(spec, "train")), AnswerCodec(tokenizer, schedule)


def build(shape: Shape, codec: AnswerCodec, device: torch.device) -> GroundingModule:
    """The Video LLM, created on ``device`` in bf16 (no full-precision copy on the host)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            lm = build_language_model(
                codec.tokenizer, LMSpec(tiny=shape.lm, dtype="bfloat16", gradient_checkpointing=True), None
            )
            lm.resize_token_embeddings(max(shape.vocab, len(codec.tokenizer)), mean_resizing=False)
            lm = apply_lora(lm, LORA, grounding_token_ids(codec.tokenizer))
            video_llm = VideoLLM.from_config(
                lm,
                codec,
                projector=ProjectorSpec(frames_per_token=1),
                aux=AuxSpec(),
                saliency_weight=3.0,
                feature_dim=shape.feature_dim,
                num_frames=NUM_FRAMES,
            )
    finally:
        torch.set_default_dtype(default_dtype)
    module = GroundingModule(video_llm, codec, 1.0, OptimSpec(), InferenceSpec(), saliency_weight=3.0)
    return module.to(torch.bfloat16)  # peft keeps adapters in float32; FSDP flattens one dtype per unit


class TrainingLoss(nn.Module):
    """The module's training loss as a ``forward``, so an FSDP root wraps it (as Lightning does)."""

    def __init__(self, module: GroundingModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module._losses(batch)["loss"]


def model_flops_per_token(module: GroundingModule, tokens: int) -> float:
    lm = module.model.lm
    config = lm.config
    lora = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    matmul = sum(
        m.weight.numel() for n, m in lm.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n
    )
    return 4 * matmul + 12 * config.num_hidden_layers * tokens * config.hidden_size + 6 * lora


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS


def train_step(loss_fn: nn.Module, batch: dict, optimizer, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_fn(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_steps(loss_fn: nn.Module, batch: dict, optimizer, steps: int, device: torch.device) -> float:
    """Seconds per step after 2 warm-up steps."""
    for _ in range(2):
        train_step(loss_fn, batch, optimizer, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(loss_fn, batch, optimizer, device)
    sync()
    return (time.perf_counter() - start) / steps


def batch_of(dataset: GroundingDataset, codec: AnswerCodec, size: int, device: torch.device) -> dict:
    collate = GroundingCollator(codec, partial(render_prompt, DEFAULT_TEMPLATE), NUM_FRAMES)
    batch = collate([dataset[(0, i % len(dataset))] for i in range(size)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def optimizer_for(module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


def fits(module: GroundingModule, dataset, codec, size: int, device: torch.device) -> bool:
    """Whether a training step of batch ``size`` fits the device's memory."""
    optimizer = optimizer_for(module, device)
    try:
        batch = batch_of(dataset, codec, size, device)
        for _ in range(2):  # the optimizer's state is made in the first
            train_step(TrainingLoss(module), batch, optimizer, device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        module.zero_grad(set_to_none=True)
        del optimizer
        torch.cuda.empty_cache()


def measure(loss_fn: nn.Module, batch: dict, steps: int, device: torch.device, flops: float, peak: float):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed_steps(loss_fn, batch, optimizer_for(loss_fn, device), steps, device)
    tokens = int(batch["attention_mask"].sum())
    return {
        "tokens_per_s": tokens / seconds,
        "samples_per_s": len(batch["records"]) / seconds,
        "peak_mem_gb": peak_memory_gb(device),
        "mfu": tokens / seconds * flops / (peak * 1e12),
    }


@contextlib.contextmanager
def single_process_group(device: torch.device):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=0, world_size=1, device_id=device if device.type == "cuda" else None
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=at_least_one, default=5)
    parser.add_argument("--batch", type=at_least_one, default=2, help="the batch timed off GPU (no search)")
    parser.add_argument("--max-batch", type=at_least_one, default=256)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--quick", action="store_true", help="--shape tiny --steps 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps = "tiny", 1
    # Each decoder layer holds frozen weights and LoRA adapters: FSDP then keeps gradient memory for
    # the whole unit (torch warns per layer; said once here).
    warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False.*")
    device, shape = torch.device(args.device), SHAPES[args.shape]
    if device.type == "cuda" and device.index is None:  # a process group's device_id needs the index
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"machine: {machine()}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    dataset, codec = data(shape, max(args.max_batch, 64))
    module = build(shape, codec, device)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    print(
        f"shape {args.shape}: {total / 1e6:.1f} M parameters, {trainable / 1e6:.1f} M trainable, "
        f"attention {module.model.lm.config._attn_implementation}"
    )
    largest = args.batch
    if device.type == "cuda":
        largest, size = 0, 1
        while size <= args.max_batch and fits(module, dataset, codec, size, device):
            largest, size = size, size * 2
        if not largest:
            raise SystemExit("error: not even a batch of 1 fits")
    batch = batch_of(dataset, codec, largest, device)
    print(f"batch {largest}, {batch['input_ids'].shape[1]} tokens per sample")
    flops = model_flops_per_token(module, batch["input_ids"].shape[1])
    peak = peak_tflops(device, args.peak_tflops)
    figures: dict[str, float] = {"largest_batch": largest if device.type == "cuda" else math.nan}
    plain = measure(TrainingLoss(module), batch, args.steps, device, flops, peak)
    figures |= {f"plain_{k}": v for k, v in plain.items()}
    with single_process_group(device):
        wrapped = FullyShardedDataParallel(
            TrainingLoss(module),
            auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(module.model.lm)),
            use_orig_params=True,
            device_id=device,  # on CPU (gloo) FSDP needs it named
        )
        fsdp = measure(wrapped, batch, args.steps, device, flops, peak)
    figures |= {f"fsdp_{k}": v for k, v in fsdp.items()}
    if math.isnan(peak):
        print("mfu: nan (no known bf16 peak for this device; give --peak-tflops)")
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
